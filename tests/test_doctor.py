"""`genssd doctor` against teacher processes on 127.0.0.1: the test teacher (which ignores `n` on
request, honours seeds and stop strings, and writes words, not a continuation) and, in
test_real_teacher.py, the real llama.cpp server."""

from conftest import genssd, run_config, write_config


def doctor(tmp_path, base_url: str, *extra: str):
    config = write_config(tmp_path / "c.yaml", run_config(base_url))
    return genssd("doctor", str(config), *extra)


def rows(stdout: str) -> dict[str, str]:
    """check name -> the rest of its table line."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1]:
            found[cells[1]] = " ".join(cells[2:])
    return found


def test_doctor_reports_what_the_endpoint_does(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n")
    result = doctor(tmp_path, server.base_url)
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert found["reachable"].startswith("ok yes")
    assert found["model listed"].startswith("ok fake-teacher")
    assert found["completion"].startswith("ok /v1/completions answers")
    assert found["n > 1 honoured"].startswith("no asked 3 choices, got 1")
    assert "once per candidate" in found["n > 1 honoured"]
    assert found["seed honoured"].startswith("ok same seed, same text; another seed, another")
    assert found["continues the prefix"].startswith("no")  # the test teacher writes words 'wN'
    assert found["stop strings honoured"].startswith("ok")
    assert found["context length"].startswith("?")
    assert "see the rows marked no: n > 1 honoured, continues the prefix" in result.stdout
    # Every probe is a few tokens.
    assert all(r["max_tokens"] <= 12 for r in server.requests())


def test_doctor_when_n_is_honoured(tmp_path, fake_teacher):
    server = fake_teacher()
    result = doctor(tmp_path, server.base_url)
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout)["n > 1 honoured"].startswith("ok asked 3 choices, got 3")


def test_doctor_on_an_unreachable_endpoint_is_one_error_line(tmp_path):
    from genssd_cli.launch import free_port

    result = doctor(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    assert result.returncode == 1
    assert rows(result.stdout)["reachable"].startswith("no no (connection)")
    assert result.stderr.strip() == "error: the teacher endpoint cannot serve a run: reachable failed"


def test_doctor_on_a_model_not_served(tmp_path, fake_teacher):
    server = fake_teacher("--model", "another-model")
    result = doctor(tmp_path, server.base_url)
    assert result.returncode == 1
    assert "'fake-teacher' is not served" in result.stdout and "another-model" in result.stdout
    assert "model listed failed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
