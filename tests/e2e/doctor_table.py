"""Reading `genssd doctor`'s table back from its terminal output, for the tests that run doctor
(imported as `doctor_table`: pytest puts this folder on sys.path for its test files). No tests here."""


def rows(stdout: str) -> dict[str, str]:
    """check name -> the rest of its table row (a row folded over several lines joined up)."""
    found: dict[str, list[list[str]]] = {}
    last = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) <= 3:
            last = None
            continue
        if cells[1]:
            last = cells[1]
            found[last] = [[c] for c in cells[2:]]
        elif last is not None:
            for column, cell in zip(found[last], cells[2:], strict=False):
                column.append(cell)
    return {check: " ".join(" ".join(p for p in col if p) for col in cols) for check, cols in found.items()}
