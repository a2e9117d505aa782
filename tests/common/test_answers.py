"""Answer extraction and matching (genssd_cli/answers.py), in process on literal texts: the answer
taken from \\boxed{}, "####", "the answer is" or the last equation (and, explicit, only from a stated
one); gold and predicted answers equal or not across number formats, money, percent, units and
LaTeX, the symbolic ones through math-verify in a worker process."""

import pytest

from genssd_cli.answers import answers_match, extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so it is \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("work\n#### 1,234\n", "1,234"),
        ("Thus the answer is 19.", "19"),
        ("The answer is: $42", "$42"),
        ("The answer is 18 - 4 = 14 cookies.", "14 cookies"),
        ("3 + 4 = 7 then 7 * 2 = 14", "14"),
        ("no numbers here", None),
        ("\\boxed{a} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
    ],
)
def test_extract(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("gold", "pred", "same"),
    [
        ("18", "\\$18", True),
        ("18", "$18.00", True),
        ("1000", "1,000", True),
        ("0.5", "1/2", True),
        ("0.5", "\\frac{1}{2}", True),
        ("25%", "0.25", True),
        ("12", "12 dollars", True),
        ("-3", "-3", True),
        ("694", "649", False),
        ("7", "7.5", False),
        ("7", None, False),
        ("7", "", False),
        ("\\sqrt{2}", "\\sqrt{2}", True),  # math-verify path, in a worker process
        ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}", False),
        # thousands separators, decimals, signs
        ("1234567", "1,234,567", True),
        ("1,234", "1234.0", True),
        ("0.75", ".75", True),
        ("3", "3.000", True),
        ("-2", "2", False),
        ("100", "1000", False),
        ("0.1", "0.10000001", False),
        # money, percent, units, LaTeX text
        ("\\$5", "5", True),
        ("5", "\\$5.00", True),
        ("40%", "40", True),  # a percent may be meant as its bare number (GSM8K golds drop the sign)
        ("50", "50\\%", True),
        ("50", "5%", False),
        ("0.4", "40%", True),
        ("12", "\\text{12}", True),
        ("7", "7 apples.", True),
        # fractions and LaTeX forms
        ("\\frac{3}{4}", "0.75", True),
        ("\\dfrac{1}{3}", "\\frac{1}{3}", True),
        ("1/3", "0.333", False),
        ("\\frac{2}{4}", "\\frac{1}{2}", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("x^2+1", "1+x^2", True),
        ("\\{1, 2\\}", "\\{2, 1\\}", True),
        ("\\pi", "3.14", False),
    ],
)
def test_match(gold, pred, same):
    assert answers_match(gold, pred) is same


@pytest.mark.parametrize(
    ("text", "lenient", "explicit"),
    [
        ("so 3 + 4 = 7", "7", None),  # a last number is not a stated answer
        ("The answer is 7.", "7", "7"),
        ("#### 12", "12", "12"),
        ("so \\boxed{x^2} holds, 5", "x^2", "x^2"),
        ("nothing here", None, None),
    ],
)
def test_explicit_answers_skip_the_last_number_fallback(text, lenient, explicit):
    assert extract_answer(text) == lenient
    assert extract_answer(text, explicit=True) == explicit


# Hostile texts: a reply is untrusted. Each input below took seconds to minutes with the quadratic
# regexes the code had before (16,000 digits: 34 s; 16,000 blank lines after "answer:": 4 s); at
# 100,000 characters a quadratic reading would take far beyond the bound, a linear one milliseconds.
@pytest.mark.parametrize(
    "text",
    ["1" * 100_000 + "!", "1," * 50_000 + "!", "answer:" + "\n" * 100_000, "answer is" + " " * 100_000,
     "\\boxed{" * 20_000],
)  # fmt: skip
def test_answer_parsing_is_linear_on_hostile_texts(text):
    import time

    from genssd_cli.answers import answer_statement_start, to_number

    began = time.perf_counter()
    extract_answer(text)
    extract_answer(text, explicit=True)
    answer_statement_start(text)
    to_number(text)
    assert time.perf_counter() - began < 5.0


def test_plain_numbers_read_as_before():
    """The linear number pattern accepts exactly what the earlier one did (its text: `-?[\\d,]*\\.?\\d+`)."""
    import itertools
    import re

    from genssd_cli.answers import _PLAIN_NUMBER

    earlier = re.compile(r"(-?[\d,]*\.?\d+(?:/\d+)?)\s*[A-Za-z ]*")
    for n in range(1, 7):
        for chars in itertools.product("12,.-/ a", repeat=n):
            text = "".join(chars)
            before, now = earlier.fullmatch(text), _PLAIN_NUMBER.fullmatch(text)
            assert (before and before.group(1)) == (now and now.group(1)), text


def test_a_check_that_times_out_does_not_fail_another_threads_check():
    """One worker process serves every thread's math-verify checks; a check that hangs is killed at
    its timeout, which breaks the pool under the check queued behind it: that one is asked again on
    a fresh worker and returns its own result instead of raising."""
    import operator
    import time
    from concurrent.futures import ThreadPoolExecutor

    from genssd_cli.answers import run_isolated

    with ThreadPoolExecutor(2) as threads:
        hung = threads.submit(run_isolated, time.sleep, (60,), 3.0, "timed out")
        time.sleep(0.5)  # the hanging call holds the only worker; the next one queues behind it
        queued = threads.submit(run_isolated, operator.add, (2, 3), 30.0, "timed out")
        assert hung.result() == "timed out"
        assert queued.result() == 5
