"""The embedded tasks: small integer arithmetic expressions, labelled by one parser.

Expressions over single digits, ``+ - *`` and parentheses (``(3+4)*2-5``) are drawn from a
seeded generator. Three tasks read the same characters but ask different questions, so a shared
encoder pays off: is the string well-formed (sequence classification), what role does each
token play (token classification: a digit that is a factor of a product is tagged differently
from one that is a term of a sum, so the tags need operator precedence and parentheses), and what
is its value (generation of the decimal digits; regression of ``value / 100`` as a fourth,
optional task). One recursive-descent parser is the single source of every label.
``ARITHMETIC_TASKS`` declares the tasks; ``MultitaskDataModule`` and ``MultitaskModule`` default to them.

Grammar::

    expr   := term (("+" | "-") term)*
    term   := factor ("*" factor)*
    factor := DIGIT | "(" expr ")"
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zoo.multitask.tasks import (
    GENERATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TaskSpec,
)
from zoo.multitask.vocab import SPECIAL_TOKENS

__all__ = [
    "ALPHABET",
    "ARITHMETIC_TASKS",
    "ARITHMETIC_VOCAB_SIZE",
    "DEFAULT_TASKS",
    "ROLE_TAGS",
    "ExpressionError",
    "Parsed",
    "corrupt",
    "parse",
    "random_expression",
]

DIGITS = "0123456789"
OPERATORS = "+-*"
ALPHABET = DIGITS + OPERATORS + "()"
#: the shared character vocabulary's size: the special tokens, then the alphabet
ARITHMETIC_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET)
#: token-classification labels, in id order
ROLE_TAGS = ("term", "factor", "plus", "minus", "times", "open", "close")
_OP_TAG = {"+": 2, "-": 3, "*": 4}
REGRESSION_SCALE = 100.0

#: the embedded tasks: name -> declaration (a YAML ``tasks:`` list may pick and re-weight them)
ARITHMETIC_TASKS: dict[str, TaskSpec] = {
    "wellformed": TaskSpec("wellformed", SEQUENCE_CLASSIFICATION, num_classes=2, label_names=["no", "yes"]),
    "roles": TaskSpec("roles", TOKEN_CLASSIFICATION, num_classes=len(ROLE_TAGS), label_names=list(ROLE_TAGS)),
    "value": TaskSpec("value", GENERATION, max_target_length=8),
    "value_regression": TaskSpec("value_regression", REGRESSION, num_classes=1),
}
#: the tasks used when none are declared
DEFAULT_TASKS = ("wellformed", "roles", "value")


class ExpressionError(ValueError):
    """The text is not an expression of the grammar; ``position`` is the offending character."""

    def __init__(self, text: str, position: int, expected: str) -> None:
        found = repr(text[position]) if position < len(text) else "the end"
        super().__init__(f"{text!r}: expected {expected} at position {position}, found {found}")
        self.position = position


@dataclass(frozen=True)
class Parsed:
    value: int
    tags: tuple[int, ...]  # one ROLE_TAGS id per character


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.tags = [-1] * len(text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-") and self.peek():
            op = self.peek()
            self.tags[self.pos] = _OP_TAG[op]
            self.pos += 1
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> int:
        value, digits = self.factor()
        direct = [digits] if digits is not None else []
        count = 1
        while self.peek() == "*":
            self.tags[self.pos] = _OP_TAG["*"]
            self.pos += 1
            right, digits = self.factor()
            if digits is not None:
                direct.append(digits)
            value *= right
            count += 1
        for position in direct:  # a bare digit is a factor only when its term multiplies
            self.tags[position] = 1 if count > 1 else 0
        return value

    def factor(self) -> tuple[int, int | None]:
        char = self.peek()
        if char and char in DIGITS:
            self.pos += 1
            return int(char), self.pos - 1
        if char == "(":
            self.tags[self.pos] = 5
            self.pos += 1
            value = self.expr()
            if self.peek() != ")":
                raise ExpressionError(self.text, self.pos, "')' or an operator")
            self.tags[self.pos] = 6
            self.pos += 1
            return value, None
        raise ExpressionError(self.text, self.pos, "a digit or '('")


def parse(text: str) -> Parsed:
    """Value and per-character role tags of a well-formed expression; ``ExpressionError`` otherwise."""
    if not text:
        raise ExpressionError(text, 0, "a digit or '('")
    parser = _Parser(text)
    value = parser.expr()
    if parser.pos != len(text):
        raise ExpressionError(text, parser.pos, "an operator or the end")
    return Parsed(value, tuple(parser.tags))


def is_well_formed(text: str) -> bool:
    try:
        parse(text)
    except ExpressionError:
        return False
    return True


def _render(rng: random.Random, operands: int, extra_parens: float, products: list[int]) -> tuple[str, str]:
    """``(text, top operator)`` of a random tree with ``operands`` leaves; ``""`` for a leaf.

    ``products`` is a one-element budget of ``*`` operators still allowed (shared by the recursion).
    """
    if operands == 1:
        return rng.choice(DIGITS), ""
    left_n = rng.randint(1, operands - 1)
    op = rng.choice(OPERATORS if products[0] > 0 else "+-")
    if op == "*":
        products[0] -= 1
    left, left_op = _render(rng, left_n, extra_parens, products)
    right, right_op = _render(rng, operands - left_n, extra_parens, products)
    # parentheses where precedence or left-associativity demand them, plus a few redundant ones
    if (op == "*" and left_op in ("+", "-")) or (left_op and rng.random() < extra_parens):
        left = f"({left})"
    needed = (op == "*" and right_op) or (op == "-" and right_op in ("+", "-"))
    if needed or (right_op and rng.random() < extra_parens):
        right = f"({right})"
    return left + op + right, op


def random_expression(
    rng: random.Random,
    min_operands: int = 2,
    max_operands: int = 3,
    extra_parens: float = 0.2,
    max_products: int = 1,
) -> str:
    """A well-formed expression: ``min..max_operands`` single digits, at most ``max_products`` ``*``."""
    return _render(rng, rng.randint(min_operands, max_operands), extra_parens, [max_products])[0]


def corrupt(rng: random.Random, text: str) -> str:
    """One random edit (delete, insert, replace or swap a character); the result may stay well-formed."""
    chars = list(text)
    edit = rng.choice(("delete", "insert", "replace", "swap"))
    i = rng.randrange(len(chars))
    if edit == "delete" and len(chars) > 1:
        del chars[i]
    elif edit == "insert":
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(ALPHABET))
    elif edit == "swap" and len(chars) > 1:
        j = min(i + 1, len(chars) - 1) if i + 1 < len(chars) else i - 1
        chars[i], chars[j] = chars[j], chars[i]
    else:
        chars[i] = rng.choice(ALPHABET.replace(chars[i], ""))
    return "".join(chars)
