"""Final-answer extraction and mathematical-equivalence checking (DESIGN.md §5).

MATH answers are compared in three stages, cheapest first:
  1. string equality after `normalize_math_answer` (Hendrycks et al.'s MATH normalization,
     extended with unit/degree/percent/option-letter rules);
  2. numeric equality of plain numbers and fractions (relative tolerance 1e-6 when a decimal is
     involved, exact otherwise; an answer written with `%` also matches its value / 100);
  3. symbolic equality: a small recursive-descent LaTeX parser builds sympy expressions, which are
     compared at fixed sample points and then confirmed with `simplify(a - b) == 0`.
Tuples, intervals, sets, matrices, unions and comma-separated answer lists are split and compared
element by element (ordered for tuples/intervals/matrices, unordered for sets/lists/unions).

Stage 3 never hangs: it only sees short strings, rejects huge powers/factorials while parsing,
and runs under a SIGALRM time limit when called from the main thread. From other threads
(no SIGALRM there) it skips `simplify` and trusts the sample-point comparison alone.

GSM8K answers are the number after `####`, else the last number of the text.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import signal
import threading
import time
from fractions import Fraction
from typing import Any, Callable, Iterator

# Relative tolerance when either answer is written with a decimal point (a rounded value).
# Answers in exact notation (integers, fractions, radicals) must agree to _EXACT_TOL, which
# only absorbs the rounding of a 30-digit evaluation: 1000001 is not 1000000.
REL_TOL = 1e-6
_EXACT_TOL = 1e-15
# Strings longer than this (after normalization) are never handed to sympy.
_SYMPY_MAX_LEN = 150
_SYMPY_TIMEOUT_S = 2.0
_MAX_DIGITS = 10_000  # largest power/factorial result (in decimal digits) the parser builds

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def _balanced_group(text: str, start: int) -> tuple[str, int] | None:
  """Contents of the `{...}` group opening at text[start], and the index after it."""
  if start >= len(text) or text[start] != "{":
    return None
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c == "\\":
      continue
    if c == "{" and text[i - 1] != "\\":
      depth += 1
    elif c == "}" and text[i - 1] != "\\":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None


def _last_boxed(text: str) -> str | None:
  """Contents of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in text."""
  starts = sorted(m.start() for m in re.finditer(r"\\boxed|\\fbox", text))
  for start in reversed(starts):
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i].isalpha():
      continue  # some other command, e.g. \boxedsomething
    j = i
    while j < len(text) and text[j] in " \t":
      j += 1
    if j < len(text) and text[j] == "{":
      group = _balanced_group(text, j)
      if group is not None and group[0].strip():
        return group[0].strip()
    elif j > i:
      # `\boxed 5`: the argument runs to the closing math delimiter or the end of the line.
      arg = re.split(r"(?<!\\)\$|\n", text[j:])[0].strip()
      if arg:
        return arg
  return None


def _first_math_span(text: str) -> str | None:
  """Contents of the first `$...$` (or `\\(...\\)`) span of text, if any."""
  m = (re.search(r"(?<!\\)\$\$?(.+?)(?<!\\)\$", text, re.S)
       or re.search(r"\\\((.+?)\\\)", text, re.S))
  return m.group(1).strip() if m else None


_FINAL_ANSWER_RES = (
    re.compile(r"final answer is[:\s]*(.+?)(?:\.?\s*I hope it is correct|$)", re.I | re.S),
    re.compile(r"final answer\s*:\s*(.+)", re.I | re.S),
    re.compile(r"the answer is[:\s]*(.+)", re.I | re.S),
)


def extract_math_answer(text: str) -> str | None:
  """Final answer of a MATH-style solution or model generation.

  The contents of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces; also `\\boxed 5`),
  else what follows the last "The final answer is", "Final Answer:" or "the answer is" (the
  first `$...$` span there, else the rest of the line without its final period). None if the
  text has none of these. The answer is returned as written, not normalized.
  """
  if not text:
    return None
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed
  for pattern in _FINAL_ANSWER_RES:
    matches = list(pattern.finditer(text))
    if not matches:
      continue
    rest = matches[-1].group(1).strip()
    span = _first_math_span(rest)
    if span is None:
      line = rest.split("\n")[0].strip()
      span = re.split(r"\.\s+(?=[A-Z])", line)[0]  # first sentence
      span = re.sub(r"[.\s]+$", "", span)
    span = span.strip().rstrip(".").strip()
    if span:
      return span
  return None


# A `-` is a sign unless it follows a word or a closing bracket (`3-5` is a range, `x-2` a
# difference); a number never starts inside another number.
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}.])-)?\$?\s?(?<![\d.])"
                        r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                        r"|(?<![\w.])-?\.\d+")


def _canonical_number(token: str) -> str | None:
  """'1,234.50' -> '1234.5', '$-3' -> '-3', '.5' -> '0.5', '007' -> '7'."""
  s = token.replace(",", "").replace("$", "").replace(" ", "")
  m = re.fullmatch(r"(-?)(\d*)(?:\.(\d+))?", s)
  if m is None or not (m.group(2) or m.group(3)):
    return None
  sign, whole, frac = m.group(1), str(int(m.group(2) or "0")), (m.group(3) or "").rstrip("0")
  out = whole + ("." + frac if frac else "")
  return "0" if out == "0" else sign + out


def extract_gsm8k_answer(text: str) -> str | None:
  """GSM8K answer: the number after the last `####`, else the last number in text.

  Commas, `$` and a trailing period are dropped; negatives and decimals are kept. The result is
  canonical ("18", "-3.5", "0.25"), so it can be compared to the gold with `==`. None if there
  is no number.
  """
  if not text:
    return None
  text = text.replace("\u2212", "-")
  if "####" in text:
    m = _NUMBER_RE.search(text.rsplit("####", 1)[1])
    if m:
      return _canonical_number(m.group(0))
  matches = _NUMBER_RE.findall(text)
  return _canonical_number(matches[-1]) if matches else None


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------

_TRAILING_TEXT_UNIT_RE = re.compile(
    r"^(?P<head>.*\S)\s*\\text\s*\{\s*[A-Za-z][A-Za-z .]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$", re.S)
# `5 cm^2`, `5 apples`: plain words after a number (units, or the noun the answer counts).
_TRAILING_PLAIN_UNIT_RE = re.compile(
    r"^(?P<head>.*[\d}])\s+(?:[A-Za-z]{2,}\.?\s*)+(?:\^\s*\{?[23]\}?)?$")
_VAR_PREFIX_RE = re.compile(
    r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*=(?!=)\s*(?P<rhs>.+)$", re.S)


_FRAC_SQRT_RE = re.compile(r"\\(frac|sqrt)(?![A-Za-z])")
_COMMAND_RE = re.compile(r"\\[A-Za-z]+|\\.")


def _fix_fracs_and_sqrt(s: str) -> str:
  """Brace every `\\frac` / `\\sqrt` argument.

  `\\frac12` -> `\\frac{1}{2}`, `\\frac\\pi2` -> `\\frac{\\pi}{2}`, `\\sqrt2` -> `\\sqrt{2}`.
  """
  out, i = [], 0
  while i < len(s):
    m = _FRAC_SQRT_RE.match(s, i)
    if m is None:
      out.append(s[i])
      i += 1
      continue
    name, j = m.group(1), m.end()
    out.append("\\" + name)
    if name == "sqrt":
      while j < len(s) and s[j] == " ":
        j += 1
      if j < len(s) and s[j] == "[":
        close = s.find("]", j)
        if close < 0:
          i = j
          continue
        out.append(s[j:close + 1])
        j = close + 1
    for _ in range(2 if name == "frac" else 1):
      while j < len(s) and s[j] == " ":
        j += 1
      if j >= len(s):
        break
      if s[j] == "{":
        group = _balanced_group(s, j)
        if group is None:
          break
        out.append("{" + _fix_fracs_and_sqrt(group[0]) + "}")
        j = group[1]
      elif s[j] == "\\":
        cmd = _COMMAND_RE.match(s, j)
        out.append("{" + cmd.group(0) + "}")
        j = cmd.end()
      else:
        out.append("{" + s[j] + "}")
        j += 1
    i = j
  return "".join(out)


def _strip_var_prefix(s: str) -> str:
  """`x = 5` -> `5`, also per comma-separated part (`x=1, y=2` -> `1,2`)."""
  parts = _split_top(s, ",")
  stripped = []
  for part in parts:
    m = _VAR_PREFIX_RE.match(part)
    stripped.append(m.group("rhs") if m and "=" not in m.group("rhs") else part)
  return ",".join(p.strip() for p in stripped)


def normalize_math_answer(s: str) -> str:
  """Canonical string form of a MATH answer (Hendrycks et al.'s `strip_string`, extended).

  Removes: `$`, math delimiters, spacing commands, `\\left`/`\\right`, `\\displaystyle`, units
  (`5\\text{ cm}^2`, `5 cm`), degrees (`^\\circ`), `\\%`, `x =` prefixes, thousands commas in a
  plain number, trailing zeros of decimals, a trailing period; rewrites `\\dfrac`/`\\tfrac` ->
  `\\frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`, `.5` -> `0.5`, `a/b` ->
  `\\frac{a}{b}` for integers, `x^{2}` -> `x^2`, `\\text{(A)}` -> `A`; unwraps `\\boxed{}` and
  `\\text{}`. Whitespace is removed except one space between a command and a following letter
  (`\\pi r`), which keeps the string parseable.
  """
  s = str(s).strip()
  if "\\boxed" in s or "\\fbox" in s:
    s = _last_boxed(s) or s
  s = s.replace("\n", " ").replace("\u2212", "-").replace("\u00b0", "\\circ")
  m = re.fullmatch(r"\\\((.*)\\\)|\\\[(.*)\\\]", s, re.S)
  if m:
    s = m.group(1) if m.group(1) is not None else m.group(2)
  s = re.sub(r"(?<!\\)\\[!,;: ]|\\q?quad(?![A-Za-z])|\\displaystyle|~", " ", s)
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  s = re.sub(r"\\(?:left|right)\s*\.", "", s)
  s = re.sub(r"\\(?:left|right|[Bb]igg?[lr]?)(?![A-Za-z])", "", s)
  s = re.sub(r"\\(?:mbox|textbf|textrm|textit|textnormal|mathrm|mathbf|mathit)\s*\{", r"\\text{", s)
  s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
  s = s.replace("\\$", "").replace("$", "")
  s = s.replace("\\%", "").replace("%", "")
  s = re.sub(r"\\text\s*\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+", ",", s)
  while True:  # a number can carry several unit words: `5\text{ cm}\text{ }`
    m = _TRAILING_TEXT_UNIT_RE.match(s) or _TRAILING_PLAIN_UNIT_RE.match(s)
    if m is None:
      break
    s = m.group("head")
  while True:  # unwrap innermost \text{...} first
    new = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    if new == s:
      break
    s = new
  s = s.strip()
  s = re.sub(r"[.,;\s]+$", "", s) if not re.search(r"\\[.,;]$", s) else s
  s = _strip_var_prefix(s)
  s = _fix_fracs_and_sqrt(s)
  # Drop whitespace, but keep one space where it separates a command from a letter (`\pi r`).
  s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
  s = re.sub(r"\s+", "", s).replace("\x00", " ")
  s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
  s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
  if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  # Trailing zeros of decimals: 2.50 -> 2.5, 3.0 -> 3 (wherever a decimal appears).
  s = re.sub(r"(?<![\d.])(\d+)\.(\d*?)0+(?![\d.])",
             lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
  m = re.fullmatch(r"([+-]?)(\d+)/(\d+)", s)
  if m:
    s = "%s\\frac{%s}{%s}" % (m.group(1).lstrip("+"), m.group(2), m.group(3))
  m = re.fullmatch(r"\(([A-Za-z])\)", s)
  if m:
    s = m.group(1)
  if re.fullmatch(r"\+[\d.\\].*", s):
    s = s[1:]
  return s


# --------------------------------------------------------------------------------------------
# Structure (tuples, intervals, sets, lists, matrices)
# --------------------------------------------------------------------------------------------


def _split_top(s: str, sep: str) -> list[str]:
  """Split s at occurrences of sep that are outside every (), [], {} pair."""
  parts, depth, start, i = [], 0, 0, 0
  while i < len(s):
    c = s[i]
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif depth == 0 and s.startswith(sep, i):
      parts.append(s[start:i])
      i += len(sep)
      start = i
      continue
    i += 1
  parts.append(s[start:])
  return parts


def _structure(s: str) -> tuple[str, Any] | None:
  """(kind, elements) for a structured answer, None for a single expression.

  Kinds: "matrix" (rows of cells), "union" / "set" / "list" (unordered elements),
  "tuple" (opening bracket, closing bracket, ordered elements).
  """
  m = re.fullmatch(r"\\begin\{([pbvBV]?matrix)\}(.*)\\end\{\1\}", s, re.S)
  if m:
    rows = [r for r in m.group(2).split("\\\\") if r.strip()]
    return "matrix", [r.split("&") for r in rows]
  parts = _split_top(s, "\\cup")
  if len(parts) > 1:
    return "union", parts
  if s.startswith("\\{") and s.endswith("\\}") and len(s) >= 4:
    return "set", _split_top(s[2:-2], ",")
  if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
    depth = 0
    for i, c in enumerate(s):
      depth += c in "([{"
      depth -= c in ")]}"
      if depth == 0 and i < len(s) - 1:
        break
    else:
      elems = _split_top(s[1:-1], ",")
      if len(elems) > 1:
        return "tuple", (s[0], s[-1], elems)
  parts = _split_top(s, ",")
  if len(parts) > 1:
    return "list", parts
  return None


def _match_unordered(a: list[str], b: list[str], eq: Callable[[str, str], bool]) -> bool:
  """True if a and b pair up one-to-one under eq (greedy; enough for answer lists)."""
  if len(a) != len(b):
    return False
  unused = list(b)
  for x in a:
    for k, y in enumerate(unused):
      if eq(x, y):
        del unused[k]
        break
    else:
      return False
  return True


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_DEC = r"\d+(?:\.\d+)?"


def _to_fraction(s: str) -> Fraction | None:
  """Exact value of a normalized plain number: 3, -2.5, \\frac{1}{2}, 1/2, 1\\frac{1}{2}."""
  m = re.fullmatch(r"([+-]?)(.+)", s)
  sign, body = (-1 if m.group(1) == "-" else 1), m.group(2)
  if re.fullmatch(_DEC, body):
    return sign * Fraction(body)
  m = re.fullmatch(r"\\frac\{(%s)\}\{(%s)\}|(%s)/(%s)" % (_DEC, _DEC, _DEC, _DEC), body)
  if m:
    num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return sign * Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
  m = re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", body)  # mixed number, as written in MATH
  if m and int(m.group(3)) != 0:
    return sign * (int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))))
  return None


def _close(a: complex | float | Fraction, b: complex | float | Fraction, tol: float) -> bool:
  if a == b:
    return True
  return abs(a - b) <= tol * max(abs(a), abs(b))


def _tolerance(a: str, b: str) -> float:
  """REL_TOL if either answer is a rounded decimal, else (near-)exact comparison."""
  return REL_TOL if re.search(r"\d\.\d", a + " " + b) else _EXACT_TOL


# --------------------------------------------------------------------------------------------
# LaTeX -> sympy
# --------------------------------------------------------------------------------------------


class _Unsupported(Exception):
  """The string is outside the LaTeX subset the parser understands."""


class _Timeout(BaseException):
  """Raised by SIGALRM; a BaseException so that sympy's `except Exception` cannot swallow it."""


@functools.lru_cache(maxsize=1)
def _sympy() -> Any:
  try:
    import sympy  # pylint: disable=import-outside-toplevel
    return sympy
  except ImportError:
    return None


_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
    "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi "
    "Omega".split())
_FUNCS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split())
_ATOM_COMMANDS = (frozenset({"frac", "sqrt", "binom", "pi", "infty", "lfloor", "lceil"})
                  | _GREEK | _FUNCS)
_TOKEN_RE = re.compile(r"\s*(\\[A-Za-z]+|\\.|\d+(?:\.\d+)?|\.\d+|[A-Za-z]|\S)")


class _LatexParser:
  """Recursive-descent parser for the LaTeX of final answers, producing a sympy expression.

  Grammar (implicit multiplication binds like `*`; `^` is right-associative):
    expr    := term (('+'|'-') term)*
    term    := unary (('*'|'\\cdot'|'\\times'|'/'|'\\div') unary | power)*
    unary   := ('-'|'+') unary | power
    power   := postfix ['^' exponent]
    postfix := atom '!'*
    atom    := number | letter[_sub] | (expr) | [expr] | {expr} | |expr| | \\frac{}{} | \\sqrt[n]{}
               | \\binom{}{} | \\pi | \\infty | \\greek | \\func[^e] arg
               | \\lfloor expr \\rfloor | \\lceil expr \\rceil
  Anything else raises _Unsupported.
  """

  def __init__(self, text: str, sp: Any):
    self.toks = _TOKEN_RE.findall(text)
    if "".join(self.toks) != re.sub(r"\s+", "", text):
      raise _Unsupported(text)
    self.i = 0
    self.sp = sp
    self.abs_depth = 0

  def parse(self) -> Any:
    e = self.expr()
    if self.peek() is not None:
      raise _Unsupported(self.peek())
    return e

  def peek(self) -> str | None:
    return self.toks[self.i] if self.i < len(self.toks) else None

  def take(self, expected: str | None = None) -> str:
    t = self.peek()
    if t is None or (expected is not None and t != expected):
      raise _Unsupported(f"expected {expected!r}, got {t!r}")
    self.i += 1
    return t

  def starts_atom(self, t: str | None) -> bool:
    if t is None:
      return False
    if t[0].isdigit() or t[0] == "." or (len(t) == 1 and t.isalpha()) or t in "([{":
      return True
    if t == "|":
      return self.abs_depth == 0
    return t.startswith("\\") and t[1:] in _ATOM_COMMANDS

  def expr(self) -> Any:
    e = self.term()
    while self.peek() in ("+", "-"):
      op = self.take()
      t = self.term()
      e = e + t if op == "+" else e - t
    return e

  def term(self) -> Any:
    e = self.unary()
    while True:
      t = self.peek()
      if t in ("*", "\\cdot", "\\times"):
        self.take()
        e = e * self.unary()
      elif t in ("/", "\\div"):
        self.take()
        e = e / self.unary()
      elif self.starts_atom(t):
        e = e * self.power()
      else:
        return e

  def unary(self) -> Any:
    t = self.peek()
    if t == "-":
      self.take()
      return -self.unary()
    if t == "+":
      self.take()
      return self.unary()
    return self.power()

  def power(self) -> Any:
    base = self.postfix()
    if self.peek() == "^":
      self.take()
      return self.pow(base, self.exponent())
    return base

  def exponent(self) -> Any:
    t = self.peek()
    if t == "{":
      return self.group("{", "}")
    if t in ("-", "+"):
      self.take()
      e = self.exponent()
      return -e if t == "-" else e
    return self.postfix()

  def pow(self, base: Any, exp: Any) -> Any:
    sp = self.sp
    if exp.is_Number and base.is_Number and abs(base) > 1:
      if abs(float(exp)) * math.log10(abs(float(base))) > _MAX_DIGITS:
        raise _Unsupported("power too large")
    elif exp.is_Number and abs(exp) > 1000:
      raise _Unsupported("exponent too large")
    return sp.Pow(base, exp)

  def postfix(self) -> Any:
    a = self.atom()
    while self.peek() == "!":
      self.take()
      if a.is_number and not (a.is_Integer and 0 <= a <= 3000):
        raise _Unsupported("factorial")
      a = self.sp.factorial(a)
    return a

  def group(self, open_: str, close: str) -> Any:
    self.take(open_)
    e = self.expr()
    self.take(close)
    return e

  def arg(self) -> Any:
    """A command argument: `{expr}` or a single token (`\\frac12` reads 1 then 2)."""
    t = self.peek()
    if t == "{":
      return self.group("{", "}")
    if t is not None and t[0].isdigit() and len(t) > 1:
      self.toks[self.i] = t[1:]
      return self.sp.Integer(int(t[0]))
    return self.atom()

  def subscript(self) -> str:
    if self.peek() == "{":
      self.take()
      parts = []
      while self.peek() not in ("}", None):
        parts.append(self.take())
      self.take("}")
    else:
      parts = [self.take()]
    sub = "".join(parts)
    if not re.fullmatch(r"\w+", sub):
      raise _Unsupported(sub)
    return sub

  def atom(self) -> Any:
    sp = self.sp
    t = self.take()
    if t[0].isdigit() or (t[0] == "." and len(t) > 1):
      if self.peek() == "_":
        raise _Unsupported("number with a base subscript")
      return sp.Rational(t)
    if len(t) == 1 and t.isalpha():
      name = t
      if self.peek() == "_":
        self.take()
        name += "_" + self.subscript()
      return sp.I if name == "i" else sp.Symbol(name)
    if t == "(":
      e = self.expr()
      self.take(")")
      return e
    if t == "[":
      e = self.expr()
      self.take("]")
      return e
    if t == "{":
      e = self.expr()
      self.take("}")
      return e
    if t == "|":
      self.abs_depth += 1
      e = self.expr()
      self.take("|")
      self.abs_depth -= 1
      return sp.Abs(e)
    if not t.startswith("\\"):
      raise _Unsupported(t)
    cmd = t[1:]
    if cmd == "frac":
      num = self.arg()
      return num / self.arg()
    if cmd == "sqrt":
      if self.peek() == "[":
        idx = self.group("[", "]")
        return sp.root(self.arg(), idx)
      return sp.sqrt(self.arg())
    if cmd == "binom":
      n = self.arg()
      k = self.arg()
      if n.is_number and (not n.is_Integer or abs(n) > 3000):
        raise _Unsupported("binom")
      return sp.binomial(n, k)
    if cmd == "pi":
      return sp.pi
    if cmd == "infty":
      return sp.oo
    if cmd in _GREEK:
      name = cmd
      if self.peek() == "_":
        self.take()
        name += "_" + self.subscript()
      return sp.Symbol(name)
    if cmd in ("lfloor", "lceil"):
      e = self.expr()
      self.take("\\rfloor" if cmd == "lfloor" else "\\rceil")
      return sp.floor(e) if cmd == "lfloor" else sp.ceiling(e)
    if cmd in _FUNCS:
      return self.function(cmd)
    raise _Unsupported(t)

  def function(self, name: str) -> Any:
    sp = self.sp
    power = None
    base = None
    if name == "log" and self.peek() == "_":
      self.take()
      base = self.arg()
    if self.peek() == "^":
      self.take()
      power = self.exponent()
    if self.peek() in ("(", "[", "{"):
      arg = self.atom()
    else:  # `\sin 2x`: the argument is the implicit product that follows
      arg = self.power()
      while self.starts_atom(self.peek()) and self.peek()[1:] not in _FUNCS:
        arg = arg * self.power()
    fn = {"ln": sp.log, "log": sp.log, "exp": sp.exp, "arcsin": sp.asin, "arccos": sp.acos,
          "arctan": sp.atan}.get(name) or getattr(sp, name)
    val = sp.log(arg, base) if base is not None else fn(arg)
    return val if power is None else self.pow(val, power)


@functools.lru_cache(maxsize=4096)
def _parse_latex(s: str) -> Any:
  """sympy expression for a normalized answer, or None if it cannot be parsed."""
  sp = _sympy()
  if sp is None or not s or len(s) > _SYMPY_MAX_LEN:
    return None
  # Words are not products of variables: `Monday`, `VW`, `odd`.
  if re.fullmatch(r"[A-Za-z]{2,}", s) or re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", s)):
    return None
  try:
    return _LatexParser(s, sp).parse()
  except (_Unsupported, ArithmeticError, ValueError, TypeError, AttributeError, RecursionError):
    return None
  except Exception:  # pylint: disable=broad-except
    # sympy may raise anything on odd input; an unparseable answer is simply not equivalent.
    return None


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
  """Raise _Timeout in the body after `seconds`; yields False where SIGALRM is unavailable."""
  if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
    yield False
    return

  armed = [True]

  def handler(signum, frame):
    if armed[0]:
      raise _Timeout()

  old_handler = signal.signal(signal.SIGALRM, handler)
  old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
  start = time.monotonic()
  try:
    yield True
  finally:
    # The alarm may fire on any line here: disarm first, and restore even if it does.
    try:
      armed[0] = False
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, old_handler)
      if old_delay > 0:  # give back an outer timer what is left of it
        signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


# Sample values for free symbols: irrational-looking, distinct per symbol and trial; the last
# trial is mostly negative so that branch mistakes (`\sqrt{x^2}` vs `x`) disagree somewhere.
_SAMPLE_POINTS = ((0.7312, 1.4143, 0.5271, 1.8129, 1.1531, 0.9377),
                  (1.2917, 0.6181, 1.7327, 0.8413, 1.3793, 1.6021),
                  (-0.5813, -1.9431, 1.0937, -1.5279, 0.6653, -1.2263))


def _numeric_value(expr: Any, subs: dict[Any, float]) -> Any:
  """expr evaluated to 30 digits at subs (a sympy number), or None if not a finite number."""
  try:
    v = expr.evalf(30, subs=subs)
    c = complex(v)
  except (TypeError, ValueError, ArithmeticError, AttributeError):
    return None
  return v if all(math.isfinite(x) for x in (c.real, c.imag)) else None


def _numbers_close(va: Any, vb: Any, tol: float) -> bool:
  """|va - vb| <= tol * max(|va|, |vb|), the difference taken at 30 digits."""
  diff = abs(complex((va - vb).evalf(30)))
  return diff <= tol * max(abs(complex(va)), abs(complex(vb)))


def _sympy_equivalent(a: str, b: str) -> bool:
  """Symbolic equality of two normalized single-expression answers (never raises, never hangs)."""
  if _sympy() is None or len(a) > _SYMPY_MAX_LEN or len(b) > _SYMPY_MAX_LEN:
    return False
  try:
    with _time_limit(_SYMPY_TIMEOUT_S) as guarded:
      return _sympy_equivalent_unguarded(a, b, allow_simplify=guarded)
  except _Timeout:
    return False
  except Exception:  # pylint: disable=broad-except
    return False


def _sympy_equivalent_unguarded(a: str, b: str, allow_simplify: bool) -> bool:
  sp = _sympy()
  ea, eb = _parse_latex(a), _parse_latex(b)
  if ea is None or eb is None:
    return False
  if any(e.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for e in (ea, eb)):
    return ea == eb
  diff = ea - eb
  if diff == 0:
    return True
  symbols = sorted(diff.free_symbols, key=lambda x: x.name)
  if len(symbols) > len(_SAMPLE_POINTS[0]):
    return False
  agreed = 0
  for point in _SAMPLE_POINTS if symbols else _SAMPLE_POINTS[:1]:
    subs = dict(zip(symbols, point))
    va, vb = _numeric_value(ea, subs), _numeric_value(eb, subs)
    if va is None or vb is None:
      continue
    if not _numbers_close(va, vb, _tolerance(a, b)):
      return False
    agreed += 1
  if not symbols:
    return agreed == 1  # constants: equal to within the tolerance
  if not allow_simplify:
    return agreed == len(_SAMPLE_POINTS)
  try:
    return sp.simplify(diff) == 0
  except _Timeout:
    # Agreement at every sample point is strong evidence when simplify runs out of time.
    return agreed == len(_SAMPLE_POINTS)


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


def _scalar_equivalent(a: str, b: str, percent: tuple[bool, bool]) -> bool:
  """Equivalence of two normalized single answers; percent[k]: answer k was written with `%`."""
  if a == b:
    return True
  if re.fullmatch(r"[A-Za-z]{2,}", a) and re.fullmatch(r"[A-Za-z]{2,}", b):
    return a.lower() == b.lower()  # words: `Monday` vs `monday`
  fa, fb = _to_fraction(a), _to_fraction(b)
  if fa is not None and fb is not None:
    tol = _tolerance(a, b)
    # `10\%` matches both 10 (MATH's convention) and 0.1; but 1000 does not match `10\%`.
    return (_close(fa, fb, tol) or (percent[0] and _close(fa / 100, fb, tol))
            or (percent[1] and _close(fa, fb / 100, tol)))
  if a.count("=") == 1 and b.count("=") == 1:
    (la, ra), (lb, rb) = a.split("="), b.split("=")
    return _equivalent(la, lb, percent) and _equivalent(ra, rb, percent)
  if "=" in a or "=" in b:
    return False
  return _sympy_equivalent(a, b)


def _equivalent(a: str, b: str, percent: tuple[bool, bool]) -> bool:
  """Equivalence of two normalized answers, structure first."""
  if a == b:
    return True
  sa, sb = _structure(a), _structure(b)
  if sa is None and sb is None:
    return _scalar_equivalent(a, b, percent)
  if sa is None or sb is None:
    return False
  eq = functools.partial(_equivalent_elem, percent=percent)
  (ka, xa), (kb, xb) = sa, sb
  unordered = ("set", "list")
  if ka in unordered and kb in unordered or ka == kb == "union":
    return _match_unordered(xa, xb, eq)
  if ka != kb:
    return False
  if ka == "tuple":
    (oa, ca, ea), (ob, cb, eb) = xa, xb
    return (oa, ca) == (ob, cb) and len(ea) == len(eb) and all(map(eq, ea, eb))
  # matrix
  return (len(xa) == len(xb) and all(len(ra) == len(rb) for ra, rb in zip(xa, xb))
          and all(eq(x, y) for ra, rb in zip(xa, xb) for x, y in zip(ra, rb)))


def _equivalent_elem(a: str, b: str, percent: tuple[bool, bool]) -> bool:
  return _equivalent(normalize_math_answer(a), normalize_math_answer(b), percent)


def is_equivalent(pred: str | None, gold: str) -> bool:
  """Whether a predicted final answer is mathematically equivalent to the gold answer.

  Both are raw answer strings (e.g. from `extract_math_answer`); None never matches. Stages:
  normalized string equality, numeric equality (relative tolerance 1e-6, percent-aware), then
  symbolic equality via sympy on short strings (time-limited). Tuples/intervals/matrices compare
  element-wise in order; sets and comma-separated lists compare as multisets.
  """
  if pred is None or gold is None:
    return False
  a, b = normalize_math_answer(pred), normalize_math_answer(gold)
  if a == b:
    return True
  if not a or not b:
    return False
  return _equivalent(a, b, percent=("%" in pred, "%" in gold))
