"""Old keyword names, accepted while the other packages migrate."""  # TRANSITION

from __future__ import annotations  # TRANSITION

import functools  # TRANSITION


def renamed(**old_to_new):  # TRANSITION
    """Decorator: a call with an old keyword name is passed on under its new name."""  # TRANSITION

    def wrap(fn):  # TRANSITION
        @functools.wraps(fn)  # TRANSITION (inspect.signature shows the new names)
        def inner(*args, **kwargs):  # TRANSITION
            for old, new in old_to_new.items():  # TRANSITION
                if old in kwargs:  # TRANSITION
                    if new in kwargs:  # TRANSITION
                        raise TypeError(f"{old}= is the old name of {new}=")  # TRANSITION
                    kwargs[new] = kwargs.pop(old)  # TRANSITION
            return fn(*args, **kwargs)  # TRANSITION

        return inner  # TRANSITION

    return wrap  # TRANSITION


ATTENTION = dict(scale="softmax_scale", window="window_size")  # TRANSITION
