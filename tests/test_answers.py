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
    ],
)
def test_match(gold, pred, same):
    assert answers_match(gold, pred) is same
