"""Problems (bundled sets or a JSONL file) and prompt templates."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genssd_cli.config import DataConfig, PromptsConfig, TeacherConfig
from genssd_cli.errors import UsageError
from genssd_cli.paths import bundled_dir, package_data

BUNDLED_SETS = ("arith", "gsm8k-test")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    reference: str  # the final answer only (GSM8K's text after '####')


def load_problems(cfg: DataConfig, limit: int | None = None) -> list[Problem]:
    if cfg.source == "arith":
        rows = generate_arith(cfg.count, cfg.seed, cfg.steps)
        problems = [_to_problem(r, i, "id", "question", "answer", "arith") for i, r in enumerate(rows)]
    else:
        path = package_data("gsm8k_test.jsonl") if cfg.source == "gsm8k-test" else Path(cfg.source)
        problems = _read_jsonl(path, cfg)
    if not problems:
        raise UsageError(f"dataset {cfg.source} has no problems")
    limit = limit or cfg.limit
    return problems[:limit] if limit else problems


def _read_jsonl(path: Path, cfg: DataConfig) -> list[Problem]:
    if not path.is_file():
        hint = f" (bundled sets: {', '.join(BUNDLED_SETS)})" if path.suffix != ".jsonl" else ""
        raise UsageError(f"dataset not found: {path}{hint}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"dataset {path} is not UTF-8 (byte {exc.start})") from None
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"dataset {path} line {number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UsageError(f"dataset {path} line {number}: expected a JSON object")
        where = f"{path} line {number}"
        problem = _to_problem(row, number, cfg.id_field, cfg.question_field, cfg.answer_field, where)
        if problem.id in seen:
            raise UsageError(f"dataset {where}: duplicate problem id {problem.id!r}")
        seen.add(problem.id)
        problems.append(problem)
    return problems


def _to_problem(row: dict, number: int, id_f: str, q_f: str, a_f: str, where: str) -> Problem:
    question, answer = row.get(q_f), row.get(a_f)
    for field, value in ((q_f, question), (a_f, answer)):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UsageError(f"dataset {where}: missing field {field!r}")
    if not isinstance(question, str):
        raise UsageError(f"dataset {where}: field {q_f!r} must be text")
    raw_id = row.get(id_f)
    return Problem(
        id=str(raw_id) if raw_id is not None else f"row-{number}",
        question=question.strip(),
        reference=final_answer(str(answer)),
    )


def final_answer(answer: str) -> str:
    """GSM8K answers end with '#### N'; other datasets give the answer alone."""
    _, sep, tail = answer.rpartition("####")
    return (tail if sep else answer).strip()


# --- a seeded generator of arithmetic word problems (the demo's task) ---
# `steps` is the difficulty: the operations a solution needs (1: one addition or subtraction;
# 2: two operations; 3: three). None: the earlier mix of two- and three-step templates.

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cards", "shells", "beads", "stamps"]


def _two_names(r: random.Random) -> tuple[str, str]:
    first, second = r.sample(_NAMES, 2)
    return first, second


def _gain(r: random.Random) -> dict:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
    return {"question": q, "solution": f"{name} has {a} + {b} = {a + b} {item}.", "answer": a + b}


def _loss(r: random.Random) -> dict:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a = r.randint(5, 15)
    b = r.randint(1, min(9, a - 2))
    q = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have now?"
    return {"question": q, "solution": f"{name} has {a} - {b} = {a - b} {item}.", "answer": a - b}


def _together(r: random.Random) -> dict:
    (name, other), item = _two_names(r), r.choice(_ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?"
    return {"question": q, "solution": f"Together they have {a} + {b} = {a + b} {item}.", "answer": a + b}


def _more_than(r: random.Random) -> dict:
    (name, other), item = _two_names(r), r.choice(_ITEMS)
    b = r.randint(2, 9)
    a = b + r.randint(1, 9)
    q = f"{name} has {a} {item} and {other} has {b} {item}. How many more {item} does {name} have than {other}?"
    return {"question": q, "solution": f"{name} has {a} - {b} = {a - b} more {item}.", "answer": a - b}


def _gain_then_loss(r: random.Random) -> dict:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, 20), r.randint(2, 20)
    c = r.randint(1, a + b - 1)
    q = (f"{name} has {a} {item}. {name} gets {b} more {item} and then gives away {c} {item}. "
         f"How many {item} does {name} have now?")
    s = f"{name} has {a} + {b} = {a + b} {item}, then {a + b} - {c} = {a + b - c} {item}."
    return {"question": q, "solution": s, "answer": a + b - c}


def _boxes(r: random.Random) -> dict:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(3, 9), r.randint(4, 12)
    c = r.randint(2, a * b - 1)
    q = (f"{name} has {a} boxes of {item} with {b} {item} in each box. {name} gives away {c} "
         f"{item}. How many {item} does {name} have left?")
    s = (f"{name} starts with {a} * {b} = {a * b} {item}. "
         f"After giving away {c}, {a * b} - {c} = {a * b - c}.")
    return {"question": q, "solution": s, "answer": a * b - c}


def _change(r: random.Random) -> dict:
    name = r.choice(_NAMES)
    a, b, c = r.randint(2, 6), r.randint(2, 9), r.randint(1, 5)
    cost = a * b + c
    d = next(bill for bill in (10, 20, 50, 100) if bill > cost)
    q = (f"{name} buys {a} notebooks at ${b} each and a pen for ${c}. {name} pays with a ${d} bill. "
         f"How many dollars of change does {name} get?")
    s = (f"The notebooks cost {a} * {b} = {a * b} dollars, so the total is {a * b} + {c} = {cost}. "
         f"The change is {d} - {cost} = {d - cost}.")
    return {"question": q, "solution": s, "answer": d - cost}


def _orchard(r: random.Random) -> dict:
    a, b = r.randint(3, 12), r.randint(5, 15)
    c, d = r.randint(1, a * b // 2), r.randint(1, 20)
    q = (f"A farm has {a} rows of trees with {b} trees in each row. {c} trees are cut down and {d} "
         f"new trees are planted. How many trees are on the farm now?")
    s = (f"There are {a} * {b} = {a * b} trees. After cutting, {a * b} - {c} = {a * b - c}. "
         f"After planting, {a * b - c} + {d} = {a * b - c + d}.")
    return {"question": q, "solution": s, "answer": a * b - c + d}


def _reading(r: random.Random) -> dict:
    name = r.choice(_NAMES)
    a, b, c, d = r.randint(5, 30), r.randint(2, 7), r.randint(5, 30), r.randint(2, 7)
    q = (f"{name} reads {a} pages a day for {b} days, then {c} pages a day for {d} days. "
         f"How many pages does {name} read in total?")
    s = (f"First {a} * {b} = {a * b} pages, then {c} * {d} = {c * d} pages. "
         f"In total {a * b} + {c * d} = {a * b + c * d}.")
    return {"question": q, "solution": s, "answer": a * b + c * d}


def _bakery(r: random.Random) -> dict:
    a, b = r.randint(2, 8), r.randint(6, 24)
    total = a * b
    c = r.randrange(total % 2 or 2, total - 1, 2)  # keeps the rest even, so half is whole
    rest = total - c
    q = (f"A bakery makes {a} batches of {b} cookies. It sells {c} cookies in the morning and half "
         f"of the remaining cookies in the afternoon. How many cookies are left?")
    s = (f"It makes {a} * {b} = {total} cookies. After the morning, {total} - {c} = {rest}. "
         f"Half of {rest} is sold, so {rest} / 2 = {rest // 2} are left.")
    return {"question": q, "solution": s, "answer": rest // 2}


def _savings(r: random.Random) -> dict:
    name = r.choice(_NAMES)
    d = r.randint(2, 5)
    share = r.randint(3, 20)
    c = r.randint(1, 30)
    b = r.randint(2, 8)
    total = share * d + c
    a = -(-total // b)  # weekly savings high enough to cover the gift and the jars
    c = a * b - share * d
    q = (f"{name} saves ${a} each week for {b} weeks and then spends ${c} on a gift. {name} splits "
         f"the rest equally among {d} jars. How many dollars go in each jar?")
    s = (f"{name} saves {a} * {b} = {a * b} dollars. After the gift, {a * b} - {c} = {a * b - c}. "
         f"Each jar gets {a * b - c} / {d} = {share}.")
    return {"question": q, "solution": s, "answer": share}


Template = Callable[[random.Random], dict]
_TEMPLATES: dict[int | None, list[Template]] = {
    1: [_gain, _loss, _together, _more_than],
    2: [_gain_then_loss, _boxes],
    3: [_change, _orchard, _reading, _bakery, _savings],
    None: [_boxes, _change, _orchard, _reading, _bakery, _savings],
}
# Held-out problems for evaluation (`genssd eval --dataset arith1-heldout`, …): this seed's, which
# no training set generated here ever contains (generate_arith skips them whatever its seed).
HELDOUT_SEED = -1
HELDOUT_COUNT = 200


def generate_arith(count: int, seed: int, steps: int | None = None) -> list[dict]:
    """Deterministic for (count, seed, steps): a longer list starts with a shorter one's rows.
    Training sets (any seed but HELDOUT_SEED) leave out every held-out question."""
    return _arith_rows(count, seed, steps, frozenset() if seed == HELDOUT_SEED else _heldout_questions(steps))


@functools.lru_cache(maxsize=16)
def _heldout_questions(steps: int | None) -> frozenset[str]:
    return frozenset(r["question"] for r in _arith_rows(HELDOUT_COUNT, HELDOUT_SEED, steps))


def _arith_rows(count: int, seed: int, steps: int | None, skip: frozenset[str] = frozenset()) -> list[dict]:
    templates = _TEMPLATES[steps]
    name = "arith" if steps is None else f"arith{steps}"  # None: the earlier ids and draws, unchanged
    rows: list[dict] = []
    i = 0
    while len(rows) < count:
        row = templates[i % len(templates)](random.Random(f"genssd-{name}:{seed}:{i}"))
        if row["question"] not in skip:
            rows.append({"id": f"{name}-{seed}-{i:04d}", "question": row["question"],
                         "answer": f"{row['solution']}\n#### {row['answer']}"})  # fmt: skip
        i += 1
    return rows


# --- prompt templates ---

def load_prompt(name_or_path: str) -> str:
    """A bare name is a bundled template (prompts/NAME.txt); anything else is a file path."""
    path = Path(name_or_path)
    if path.suffix == "" and "/" not in name_or_path:
        path = bundled_dir("prompts") / f"{name_or_path}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"prompt template not found: {name_or_path}") from None
    text = text.removesuffix("\n")  # files end with a newline; the prompt must not
    if "{question}" not in text:
        raise UsageError(f"prompt template {name_or_path} has no {{question}} placeholder")
    return text


def teacher_template(prompts: PromptsConfig, teacher: TeacherConfig) -> str:
    """The teacher-side template. In chat-continue mode the prompt file is the user message. In
    completions mode it is sent as written, or wrapped in the chat template of
    prompts.teacher_chat_template (the teacher's tokenizer) with the assistant turn opened; then
    teacher.assistant_prefix. Rendering with `{question}` still in it keeps one template per run."""
    text = load_prompt(prompts.teacher)
    if teacher.mode == "chat-continue":
        return text
    if prompts.teacher_chat_template:
        from genssd_cli.models import load_tokenizer

        tokenizer = load_tokenizer(prompts.teacher_chat_template, "prompts.teacher_chat_template")
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"prompts.teacher_chat_template: {prompts.teacher_chat_template!r} has no chat template")
        system = [{"role": "system", "content": teacher.system}] if teacher.system else []
        text = tokenizer.apply_chat_template([*system, {"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    return text + teacher.assistant_prefix


def teacher_token_counter(prompts: PromptsConfig) -> Callable[[str], int] | None:
    """Counts a text's tokens with the teacher's tokenizer, when the config names it
    (prompts.teacher_chat_template): how candidates' tokens are counted when the server lists
    none per choice."""
    if not prompts.teacher_chat_template:
        return None
    from genssd_cli.models import load_tokenizer

    tokenizer = load_tokenizer(prompts.teacher_chat_template, "prompts.teacher_chat_template")
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(template: str, question: str) -> str:
    # str.replace, not str.format: few-shot examples may contain braces (LaTeX, JSON).
    return template.replace("{question}", question)
