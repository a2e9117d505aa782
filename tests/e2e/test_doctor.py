"""`genssd doctor` against teacher processes on 127.0.0.1: the test teacher (which ignores or
refuses `n` on request, honours seeds and stop strings, counts on, and serves a vLLM-like chat API
that continues a partial assistant message — or does not) and, in test_real_teacher.py, the real
llama.cpp server."""

from conftest import genssd, run_config, write_config
from doctor_table import rows


def doctor(tmp_path, base_url: str, *extra: str, **teacher):
    config = write_config(tmp_path / "c.yaml", run_config(base_url, teacher=teacher))
    return genssd("doctor", str(config), *extra)


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
    assert found["continues the prefix"].startswith("ok '1, 2, 3, 4, 5, 6, 7, 8, 9, 1' -> '0, 11, 12, 13,'")
    assert found["stop strings honoured"].startswith("ok")
    assert found["context length"].startswith("?")
    assert "see the rows marked no: n > 1 honoured" in result.stdout
    # Every probe is a few tokens.
    assert all(r["max_tokens"] <= 12 for r in server.requests())


def test_doctor_when_n_is_honoured(tmp_path, fake_teacher):
    server = fake_teacher()
    result = doctor(tmp_path, server.base_url)
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout)["n > 1 honoured"].startswith("ok asked 3 choices, got 3")
    assert rows(result.stdout)["token counts"].startswith("ok")  # listed per choice, adding up to the bill


def test_doctor_on_an_unreachable_endpoint_is_one_error_line(tmp_path):
    from genssd_cli.teacher.servers.local import free_port

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


def test_doctor_chat_continue_on_a_vllm_like_server(tmp_path, fake_teacher):
    server = fake_teacher("--reasoning")
    result = doctor(tmp_path, server.base_url, mode="chat-continue")
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert found["completion"].startswith("ok /v1/chat/completions answers")
    assert found["n > 1 honoured"].startswith("ok asked 3 choices, got 3")
    assert found["continues the prefix"].startswith("ok '1, 2, 3, 4, 5, 6, 7, 8, 9, 1' -> '0, 11, 12, 13,'")
    assert found["stop strings honoured"].startswith("ok")
    assert "(chat-continue)" in result.stdout
    assert result.stdout.strip().endswith("the endpoint can serve a run")


def test_doctor_chat_continue_with_the_wrong_prefill_is_fatal_and_says_what_to_set(tmp_path, fake_teacher):
    server = fake_teacher("--prefill", "prefix")  # honours the message's prefix: true, not continue_final_message
    result = doctor(tmp_path, server.base_url, mode="chat-continue")
    assert result.returncode == 1
    found = rows(result.stdout)
    assert found["continues the prefix"].startswith("no")
    assert "try teacher.prefill: prefix" in found["continues the prefix"]
    assert result.stderr.strip() == "error: the teacher endpoint cannot serve a run: continues the prefix failed"
    fixed = doctor(tmp_path, server.base_url, mode="chat-continue", prefill="prefix")
    assert fixed.returncode == 0, fixed.stderr
    assert rows(fixed.stdout)["continues the prefix"].startswith("ok")


def test_doctor_on_an_api_that_refuses_n(tmp_path, fake_teacher):
    server = fake_teacher("--reject-n")
    result = doctor(tmp_path, server.base_url, mode="chat-continue")
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert found["n > 1 honoured"].startswith("no asked 3 choices: refused (400")
    assert "once per candidate" in found["n > 1 honoured"]


def test_doctor_probes_every_endpoint_of_a_pool(tmp_path, fake_teacher):
    from genssd_cli.teacher.servers.local import free_port

    alive = fake_teacher()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = run_config(alive.base_url)
    del config["teacher"]["base_url"]
    config["teacher"]["endpoints"] = [{"base_url": alive.base_url, "name": "alive"},
                                      {"base_url": dead, "name": "dead"}]  # fmt: skip
    result = genssd("doctor", str(write_config(tmp_path / "pool.yaml", config)))
    assert result.returncode == 1
    assert result.stdout.count("genssd doctor: fake-teacher at") == 2
    assert result.stderr.strip() == "error: the teacher endpoint cannot serve a run: dead: reachable failed"


def test_doctor_says_when_token_counts_can_only_be_split(tmp_path, fake_teacher):
    """Before any run: a server that bills one choice of n and lists no tokens per choice gets a
    row saying its bill is split evenly and the figures approximate; one that lists them, that each
    choice is counted from them; one that sends no usage at all fails doctor when max_cost is set
    (the run would refuse it)."""
    split = rows(doctor(tmp_path, fake_teacher("--bill-one-choice", "--no-logprobs").base_url).stdout)
    assert split["token counts"].startswith("no") and "split evenly" in split["token counts"]
    assert "approximate" in split["token counts"]
    listed = rows(doctor(tmp_path, fake_teacher("--bill-one-choice").base_url).stdout)
    assert listed["token counts"].startswith("? usage bills fewer tokens than the choices hold")
    refused = doctor(tmp_path, fake_teacher("--no-usage", "--no-logprobs").base_url, "--set", "max_cost=1",
                     price={"input": 1.0, "output": 1.0})  # fmt: skip
    assert refused.returncode == 1 and "token counts" in refused.stderr
    assert "max_cost is refused" in rows(refused.stdout)["token counts"]
