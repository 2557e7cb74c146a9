"""The built-in exercises. Each test is a call and the value it must return, so a failure can say
what the learner's function returned instead of a bare AssertionError."""

from __future__ import annotations

import ast
from dataclasses import dataclass

# errors ast.literal_eval raises on text that is no plain literal (or nests too deep to parse)
_UNREADABLE = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    call: str  # a Python expression calling the learner's function
    expected: str  # a Python literal (ast.literal_eval) the call must return

    @property
    def source(self) -> str:
        return f"assert {self.call} == {self.expected}"

    def judge(self, got: str) -> tuple[bool, str]:
        """(passed, message) for the repr of what the learner's call returned. Only plain literals
        are read back, so no object of the learner's can decide the comparison."""
        expected = ast.literal_eval(self.expected)
        try:
            if ast.literal_eval(got) == expected:
                return True, ""
        except _UNREADABLE:
            pass
        return False, f"{self.call} returned {got:.300}, expected {expected!r:.300}"


@dataclass(frozen=True, slots=True)
class Exercise:
    id: str
    title: str
    function: str
    statement: str
    starter: str
    tests: tuple[Case, ...]

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "function": self.function, "tests": len(self.tests)}

    def public(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "function": self.function,
            "statement": self.statement,
            "starter": self.starter,
            "tests": [{"name": t.name, "source": t.source} for t in self.tests],
        }


def _ex(id: str, title: str, function: str, statement: str, starter: str, *tests: tuple[str, str, str]) -> Exercise:
    return Exercise(id, title, function, statement, starter, tuple(Case(*t) for t in tests))


EXERCISES: dict[str, Exercise] = {
    e.id: e
    for e in (
        _ex(
            "fizzbuzz", "FizzBuzz", "fizzbuzz",
            "Write fizzbuzz(n) returning 'Fizz' if n is divisible by 3, 'Buzz' if by 5, 'FizzBuzz' if by "
            "both, and otherwise the number as a string.",
            "def fizzbuzz(n: int) -> str:\n    ...\n",
            ("one", "fizzbuzz(1)", "'1'"),
            ("three", "fizzbuzz(3)", "'Fizz'"),
            ("five", "fizzbuzz(5)", "'Buzz'"),
            ("fifteen", "fizzbuzz(15)", "'FizzBuzz'"),
            ("ninety_eight", "fizzbuzz(98)", "'98'"),
        ),
        _ex(
            "reverse_words", "Reverse words", "reverse_words",
            "Write reverse_words(s) returning the words of s in reverse order, separated by single spaces.",
            "def reverse_words(s: str) -> str:\n    ...\n",
            ("two_words", "reverse_words('hello world')", "'world hello'"),
            ("one_word", "reverse_words('python')", "'python'"),
            ("empty", "reverse_words('')", "''"),
            ("extra_spaces", "reverse_words('  a   b c ')", "'c b a'"),
        ),
        _ex(
            "is_prime", "Prime numbers", "is_prime",
            "Write is_prime(n) returning True if the integer n is a prime number, else False.",
            "def is_prime(n: int) -> bool:\n    ...\n",
            ("zero", "is_prime(0)", "False"),
            ("one", "is_prime(1)", "False"),
            ("two", "is_prime(2)", "True"),
            ("nine", "is_prime(9)", "False"),
            ("thirteen", "is_prime(13)", "True"),
            ("large_prime", "is_prime(7919)", "True"),
            ("negative", "is_prime(-7)", "False"),
        ),
        _ex(
            "fibonacci", "Fibonacci", "fibonacci",
            "Write fibonacci(n) returning the n-th Fibonacci number, with fibonacci(0) == 0 and "
            "fibonacci(1) == 1. It must be fast for n up to 200.",
            "def fibonacci(n: int) -> int:\n    ...\n",
            ("zero", "fibonacci(0)", "0"),
            ("one", "fibonacci(1)", "1"),
            ("ten", "fibonacci(10)", "55"),
            ("twenty", "fibonacci(20)", "6765"),
            ("large", "fibonacci(200)", "280571172992510140037611932413038677189525"),
        ),
        _ex(
            "anagram", "Anagrams", "is_anagram",
            "Write is_anagram(a, b) returning True if a and b use the same letters the same number of times, "
            "ignoring case and spaces.",
            "def is_anagram(a: str, b: str) -> bool:\n    ...\n",
            ("simple", "is_anagram('listen', 'silent')", "True"),
            ("different", "is_anagram('apple', 'pale')", "False"),
            ("case", "is_anagram('Dormitory', 'dirty room')", "True"),
            ("counts", "is_anagram('aab', 'abb')", "False"),
            ("empty", "is_anagram('', '')", "True"),
        ),
        _ex(
            "sum_digits", "Sum of digits", "sum_digits",
            "Write sum_digits(n) returning the sum of the decimal digits of the integer n (ignore the sign).",
            "def sum_digits(n: int) -> int:\n    ...\n",
            ("zero", "sum_digits(0)", "0"),
            ("small", "sum_digits(123)", "6"),
            ("negative", "sum_digits(-45)", "9"),
            ("big", "sum_digits(10**20 + 7)", "8"),
        ),
    )
}
