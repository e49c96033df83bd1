"""Reading compiled pipeline files (the YAML the kfp compiler writes): the pipeline spec is the first document, a
second one may hold platform config."""
from __future__ import annotations

from typing import IO, Any, Iterator

import yaml

# libyaml's parser where PyYAML has it (its wheels do): about 14x faster on a compiled pipeline (0.8 ms instead of
# 11 ms for the example), which every run start pays. Same safe types, same yaml.YAMLError family.
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """The safe loader, except that a scalar its constructor cannot turn into a value is a yaml.YAMLError naming
    where it is, like every other fault of the file. PyYAML lets the constructor's own errors through: an integer
    of more than 4300 digits (Python's int-digit limit) or `!!int abc` is a ValueError, `2001-02-30` another,
    `!!timestamp x` an AttributeError, `!!bool maybe` a KeyError; the callers answer YAMLError only."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except UnicodeError:
            raise  # the stream's own decoding error: callers answer it as such
        except (ValueError, TypeError, AttributeError, LookupError, OverflowError) as e:
            kind = str(node.tag).rsplit(":", 1)[-1][:40]
            reason = f" ({str(e).split(':', 1)[0][:100]})" if type(e) is ValueError else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"a value tagged {kind} that cannot be read{reason}", node.start_mark
            ) from None


SAFE_LOADER = _Loader


def yaml_documents(stream: str | IO[str]) -> Iterator[Any]:
    return yaml.load_all(stream, Loader=SAFE_LOADER)
