"""Parameter paths: the one spelling that the layout, partition rules, trainable
regexes and checkpoints share. It sits below every other module, so each of
them can import it without importing the model."""

from __future__ import annotations


def path_str(path) -> str:
    """A pytree key path as "a/b/0/c"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)
