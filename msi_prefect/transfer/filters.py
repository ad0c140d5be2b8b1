"""Which files of a watched directory are uploaded: include/exclude globs and regexes.

Every rule is matched against the file's *relative POSIX path* under the watched root, for
example ``run-12/images/frame_0001.tif``. Directories are never matched on their own: a
directory is only "excluded" in the sense that every file below it is.

Glob patterns (``include`` / ``exclude``):

* A pattern **without** ``/`` matches the file *name* at any depth, like ``.gitignore``:
  ``*.log`` matches ``a.log`` and ``x/y/a.log``; ``log*`` matches ``logbook.txt`` but not
  ``dir/log/x.txt`` (the name there is ``x.txt``).
* A pattern **with** ``/`` matches the *whole* relative path from the root: ``raw/*.tif``
  matches ``raw/a.tif`` but not ``x/raw/a.tif``. A leading ``/`` is allowed and changes
  nothing (``/a.txt`` anchors a name pattern to the top level).
* ``*`` matches any run of characters except ``/``; ``?`` one character except ``/``;
  ``[abc]``, ``[a-z]``, ``[!abc]`` (or ``[^abc]``) one character from / not from a set, never
  ``/``. Write a literal ``*``, ``?`` or ``[`` as ``[*]``, ``[?]``, ``[[]``.
* ``**`` must be a whole segment and spans directories: ``**/LOGS/**`` matches every file
  under any directory called ``LOGS``; ``a/**/b.txt`` matches ``a/b.txt`` and ``a/x/y/b.txt``;
  ``data/**`` matches every file under the top-level ``data`` directory.
* Matching is case-sensitive, and ``*`` also matches names that start with a dot.
* Refused when the filter is built (``ValueError``): empty patterns, ``**`` glued to other
  characters (``**.csv``), a trailing ``/``, empty, ``.`` or ``..`` segments, backslashes
  (paths use ``/``; a Windows-style ``raw\\*.csv`` would otherwise silently mean something
  else) and unclosed ``[``.

Regex patterns (``include_regex`` / ``exclude_regex``) use Python's :mod:`re` syntax and must
match the **whole** relative path (:func:`re.fullmatch`, not :func:`re.search`): ``log`` only
matches a file called exactly ``log`` at the top level, never ``catalog.csv``. Write
``.*log.*`` if a substring match is really meant.

Decision order: a file is **excluded** if it matches a built-in default exclude (unless
``use_default_excludes`` is off), an ``exclude`` glob or an ``exclude_regex``: exclusion
always wins. Otherwise it is **included** if no include rule is given at all, or if it
matches at least one ``include`` glob or ``include_regex``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from msi_prefect.transfer.layout import STAGING_DIR_NAME, STATE_DIR_NAME

#: Always excluded unless ``FileFilter.use_default_excludes`` is off: our own staging and
#: state directories (a watched folder may also be a consumer's destination) and the
#: temporary files editors and copy tools leave next to the real file.
DEFAULT_EXCLUDES: Final[tuple[str, ...]] = (
    STAGING_DIR_NAME,
    STATE_DIR_NAME,
    f"**/{STAGING_DIR_NAME}/**",
    f"**/{STATE_DIR_NAME}/**",
    "*.tmp",
    "*.part",
    "~$*",
    ".~lock.*#",
    "*.swp",
)

# A name pattern may sit below any number of directories.
_ANY_DIRS = "(?:[^/]+/)*"


class FilterRule(enum.StrEnum):
    """The rule that decided whether a path is uploaded."""

    DEFAULT_EXCLUDE = "default-exclude"
    EXCLUDE_GLOB = "exclude-glob"
    EXCLUDE_REGEX = "exclude-regex"
    INCLUDE_GLOB = "include-glob"
    INCLUDE_REGEX = "include-regex"
    INCLUDE_ALL = "include-all"
    """No include rule was given, so everything not excluded is included."""
    NO_INCLUDE_MATCH = "no-include-match"
    """Include rules were given and none of them matched."""


_INCLUDING_RULES = frozenset(
    {FilterRule.INCLUDE_GLOB, FilterRule.INCLUDE_REGEX, FilterRule.INCLUDE_ALL}
)


@dataclass(frozen=True)
class FilterDecision:
    """Whether one relative path is uploaded, and why.

    Attributes:
        relpath: The path that was judged.
        rule: The deciding rule.
        pattern: The pattern that matched, or ``None`` for ``INCLUDE_ALL`` and
            ``NO_INCLUDE_MATCH``.
    """

    relpath: str
    rule: FilterRule
    pattern: str | None = None

    @property
    def included(self) -> bool:
        """True when the file is uploaded."""
        return self.rule in _INCLUDING_RULES

    def describe(self) -> str:
        """One line for logs and the CLI, e.g. ``excluded: 'a.tmp' matches default ...``."""
        verdict = "included" if self.included else "excluded"
        path = repr(self.relpath)
        match self.rule:
            case FilterRule.DEFAULT_EXCLUDE:
                why = (
                    f"matches built-in default exclude {self.pattern!r} "
                    "(turn off with use_default_excludes=False)"
                )
            case FilterRule.EXCLUDE_GLOB:
                why = f"matches exclude glob {self.pattern!r}"
            case FilterRule.EXCLUDE_REGEX:
                why = f"fully matches exclude regex {self.pattern!r}"
            case FilterRule.INCLUDE_GLOB:
                why = f"matches include glob {self.pattern!r} and no exclude rule"
            case FilterRule.INCLUDE_REGEX:
                why = f"fully matches include regex {self.pattern!r} and no exclude rule"
            case FilterRule.INCLUDE_ALL:
                why = "matches no exclude rule and no include rule is set (include everything)"
            case FilterRule.NO_INCLUDE_MATCH:
                why = "matches none of the include globs or regexes"
        return f"{verdict}: {path} {why}"


@dataclass(frozen=True)
class _CompiledRule:
    """One user pattern and the regex that decides it against a whole relative path."""

    pattern: str
    regex: re.Pattern[str]


@dataclass(frozen=True)
class FileFilter:
    """Include/exclude rules for the files of a watched directory (see the module docs).

    Attributes:
        include: Glob patterns; a file must match one of them (or an ``include_regex``).
            Empty together with ``include_regex`` means "every file".
        exclude: Glob patterns; a matching file is never uploaded.
        include_regex: Regexes that must match the *whole* relative path.
        exclude_regex: Regexes that must match the *whole* relative path to exclude it.
        use_default_excludes: Apply :data:`DEFAULT_EXCLUDES` as well.

    Raises:
        ValueError: A pattern is invalid (the message names the field and the pattern).
        TypeError: A field was given a single string instead of a tuple of strings.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_regex: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    use_default_excludes: bool = True
    _defaults: tuple[_CompiledRule, ...] = field(init=False, repr=False, compare=False)
    _includes: tuple[_CompiledRule, ...] = field(init=False, repr=False, compare=False)
    _excludes: tuple[_CompiledRule, ...] = field(init=False, repr=False, compare=False)
    _include_res: tuple[_CompiledRule, ...] = field(init=False, repr=False, compare=False)
    _exclude_res: tuple[_CompiledRule, ...] = field(init=False, repr=False, compare=False)
    # All globs of one side in a single regex: `matches` runs for every file of every scan.
    _exclude_globs: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _include_globs: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "include_regex", "exclude_regex"):
            value = getattr(self, name)
            # A bare string would be iterated character by character: "*.csv" -> "*", ".", ...
            if isinstance(value, str):
                raise TypeError(f"FileFilter.{name} must be a tuple of patterns, got {value!r}")
            patterns = tuple(value)
            for pattern in patterns:
                if not isinstance(pattern, str):
                    raise TypeError(f"FileFilter.{name} holds a non-string: {pattern!r}")
            object.__setattr__(self, name, patterns)
        defaults = tuple(_compile_glob(p, "DEFAULT_EXCLUDES") for p in DEFAULT_EXCLUDES)
        includes = tuple(_compile_glob(p, "include") for p in self.include)
        excludes = tuple(_compile_glob(p, "exclude") for p in self.exclude)
        object.__setattr__(self, "_defaults", defaults)
        object.__setattr__(self, "_includes", includes)
        object.__setattr__(self, "_excludes", excludes)
        object.__setattr__(
            self,
            "_include_res",
            tuple(_compile_regex(p, "include_regex") for p in self.include_regex),
        )
        object.__setattr__(
            self,
            "_exclude_res",
            tuple(_compile_regex(p, "exclude_regex") for p in self.exclude_regex),
        )
        active_excludes = (defaults if self.use_default_excludes else ()) + excludes
        object.__setattr__(self, "_exclude_globs", _combine_globs(active_excludes))
        object.__setattr__(self, "_include_globs", _combine_globs(includes))

    @property
    def includes_everything(self) -> bool:
        """True when no include rule is set, so only the exclude rules narrow the selection."""
        return not self._includes and not self._include_res

    def matches(self, relpath: str) -> bool:
        """Whether the file at ``relpath`` should be uploaded.

        Args:
            relpath: Relative POSIX path under the watched root (``a/b.csv``).

        Raises:
            ValueError: ``relpath`` is empty or absolute.
        """
        _check_relpath(relpath)
        if self._exclude_globs is not None and self._exclude_globs.fullmatch(relpath):
            return False
        if any(rule.regex.fullmatch(relpath) for rule in self._exclude_res):
            return False
        if self.includes_everything:
            return True
        if self._include_globs is not None and self._include_globs.fullmatch(relpath):
            return True
        return any(rule.regex.fullmatch(relpath) for rule in self._include_res)

    def decide(self, relpath: str) -> FilterDecision:
        """Like :meth:`matches`, but names the deciding rule and pattern.

        Raises:
            ValueError: ``relpath`` is empty or absolute.
        """
        _check_relpath(relpath)
        checks: list[tuple[FilterRule, tuple[_CompiledRule, ...]]] = [
            (FilterRule.DEFAULT_EXCLUDE, self._defaults if self.use_default_excludes else ()),
            (FilterRule.EXCLUDE_GLOB, self._excludes),
            (FilterRule.EXCLUDE_REGEX, self._exclude_res),
            (FilterRule.INCLUDE_GLOB, self._includes),
            (FilterRule.INCLUDE_REGEX, self._include_res),
        ]
        for rule, compiled in checks:
            for item in compiled:
                if item.regex.fullmatch(relpath):
                    return FilterDecision(relpath, rule, item.pattern)
        if self.includes_everything:
            return FilterDecision(relpath, FilterRule.INCLUDE_ALL)
        return FilterDecision(relpath, FilterRule.NO_INCLUDE_MATCH)

    def explain(self, relpath: str) -> str:
        """Why ``relpath`` is in or out, as one line for logs and the CLI.

        Raises:
            ValueError: ``relpath`` is empty or absolute.
        """
        return self.decide(relpath).describe()


def glob_to_regex(pattern: str) -> str:
    """Translate one glob pattern into a regex for :func:`re.fullmatch` on a relative path.

    Args:
        pattern: A glob with the semantics described in the module docs.

    Returns:
        Regex source text.

    Raises:
        ValueError: The pattern is invalid; the message says why.
    """
    if not pattern:
        raise ValueError("empty pattern")
    if "\\" in pattern:
        raise ValueError(
            "backslash is not allowed: paths use '/', and a literal *, ? or [ is written "
            "[*], [?] or [[]"
        )
    if "/" not in pattern:
        # Name pattern: the file name at any depth.
        return _ANY_DIRS + _segment_to_regex(pattern)
    if pattern.endswith("/"):
        stem = pattern.strip("/")
        raise ValueError(
            "trailing '/': patterns match files, not directories; use "
            f"'{stem}/**' for the files under it or '**/{stem}/**' at any depth"
        )
    segments = pattern.removeprefix("/").split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Not last: zero or more whole directories (the separator is included).
            # Last: everything below, at least one more segment.
            parts.append(".+" if last else _ANY_DIRS)
            continue
        if segment in ("", ".", ".."):
            raise ValueError(f"empty, '.' or '..' segment {segment!r}")
        parts.append(_segment_to_regex(segment) + ("" if last else "/"))
    return "".join(parts)


def _segment_to_regex(segment: str) -> str:
    """Regex for one path segment (no ``/``); ``**`` is only allowed as a whole segment."""
    if segment == "**":
        # A bare "**" as a name pattern: any name.
        return "[^/]+"
    if "**" in segment:
        raise ValueError(
            f"'**' must be a whole path segment (like '**/x' or 'a/**'), not part of {segment!r}"
        )
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end, char_class = _char_class(segment, i)
            out.append(char_class)
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _char_class(segment: str, start: int) -> tuple[int, str]:
    """Parse ``[...]`` starting at ``segment[start]``; return (index of ``]``, regex)."""
    i = start + 1
    negate = i < len(segment) and segment[i] in "!^"
    if negate:
        i += 1
    body_start = i
    # A "]" right after "[" or "[!" is a member, as in POSIX globs.
    if i < len(segment) and segment[i] == "]":
        i += 1
    while i < len(segment) and segment[i] != "]":
        i += 1
    if i >= len(segment):
        raise ValueError(f"unclosed '[' in {segment!r} (a literal '[' is written '[[]')")
    body = segment[body_start:i]
    # Escape what is special inside a regex class but keep "-" ranges working.
    escaped = "".join("\\" + c if c in "\\^[]&~|" else c for c in body)
    # A class never matches "/", not even through a range such as "+-0".
    return i, f"[^/{escaped}]" if negate else f"(?!/)[{escaped}]"


def _compile_glob(pattern: str, field_name: str) -> _CompiledRule:
    try:
        source = glob_to_regex(pattern)
        return _CompiledRule(pattern, re.compile(source))
    except ValueError as exc:
        raise ValueError(f"invalid {field_name} glob {pattern!r}: {exc}") from None
    except re.error as exc:
        # Positions in exc refer to the translated regex, not to the glob: leave them out.
        raise ValueError(f"invalid {field_name} glob {pattern!r}: {exc.msg}") from None


def _compile_regex(pattern: str, field_name: str) -> _CompiledRule:
    if not pattern:
        raise ValueError(f"invalid {field_name} regex '': empty pattern")
    try:
        return _CompiledRule(pattern, re.compile(pattern))
    except re.error as exc:
        raise ValueError(f"invalid {field_name} regex {pattern!r}: {exc}") from None


def _combine_globs(rules: tuple[_CompiledRule, ...]) -> re.Pattern[str] | None:
    # Only our own glob translations are combined: they have no groups or inline flags,
    # which would break (or silently change) a user regex joined into one alternation.
    if not rules:
        return None
    return re.compile("|".join(f"(?:{rule.regex.pattern})" for rule in rules))


def _check_relpath(relpath: str) -> None:
    if not relpath:
        raise ValueError("relative path is empty")
    if relpath.startswith("/"):
        raise ValueError(f"expected a path relative to the watched root, got {relpath!r}")
