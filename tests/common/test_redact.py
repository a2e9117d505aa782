"""Credentials in a base_url (user info, key-like query parameters) are redacted wherever a URL is
written or shown (labels, config.yaml, error lines) while the request uses the real one; a key
typed into api_key_env is refused without being echoed; a pool's shared key is sent only over
https or to this machine; a server's control characters and escape sequences never reach the
terminal. In process: no server, no student."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from genssd_cli.config import EndpointConfig, LaunchConfig, RunConfig, TeacherConfig, format_validation_error
from genssd_cli.errors import UsageError
from genssd_cli.redact import looks_like_key, printable, redact, shown
from genssd_cli.rundir.results_hash import dump_config_yaml
from genssd_cli.teacher.endpoint import Endpoint, api_key, shared_key_withheld
from genssd_cli.teacher.pool import TeacherClient

HOSTILE = "\x1b]0;title\x07\x1b[2J"


@pytest.mark.parametrize(("url", "seen"), [
    ("https://user:key@host/v1", "https://***@host/v1"),
    ("https://user:p@ss@host:8443/v1", "https://***@host:8443/v1"),
    ("https://host/v1?api_key=abc&region=eu", "https://host/v1?api_key=***&region=eu"),
    ("https://host/v1?key=abc", "https://host/v1?key=***"),
    ("http://h/v1?x=1&token=t#frag", "http://h/v1?x=1&token=***#frag"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
])  # fmt: skip
def test_redact_url(url, seen):
    assert redact(url) == seen


def test_redact_inside_text():
    line = "teacher http://u:secret@h:1/v1 refused; see http://h2/v1?api_key=secret2"
    assert "secret" not in redact(line) and "http://***@h:1/v1" in redact(line)


def test_printable_strips_escape_sequences_and_controls():
    assert printable(f"model-{HOSTILE}a\x9b2Jb\x00c\nd") == "model-a2Jbc d"
    assert printable("a\nb\tc", lines=True) == "a\nb\tc"
    assert "\x1b" not in shown(f"x {HOSTILE} http://u:k@h/v1") and "k@" not in shown("http://u:k@h/v1")


def test_labels_config_yaml_and_shown_url_are_redacted_the_client_keeps_the_real_one():
    url = "http://user:secret@127.0.0.1:9/v1"
    assert EndpointConfig(base_url=url).label == "***@127.0.0.1:9"
    cfg = RunConfig.model_validate({
        "teacher": {"model": "m", "endpoints": [{"base_url": url}, {"base_url": "https://h/v1?api_key=secret"}]},
        "student": {"model": "s"}, "data": {"source": "arith"},
    })  # fmt: skip
    assert "secret" not in dump_config_yaml(cfg, "hash")
    single = RunConfig.model_validate({"teacher": {"model": "m", "base_url": url}, "student": {"model": "s"},
                                       "data": {"source": "arith"}})  # fmt: skip
    assert "secret" not in dump_config_yaml(single, "hash")
    endpoint = Endpoint(single.teacher, url)
    assert "secret" not in endpoint.base_url + endpoint.name
    assert "secret" in str(endpoint.client.base_url)  # the request itself still carries it


def test_a_key_typed_into_api_key_env_is_refused_without_echo(monkeypatch):
    for where in ({"api_key_env": "sk-live-0123456789abcdef"},
                  {"endpoints": [{"base_url": "http://a/v1", "api_key_env": "sk-live-0123456789abcdef"}]}):  # fmt: skip
        with pytest.raises(ValidationError) as refused:
            TeacherConfig.model_validate({"model": "m", **({"base_url": "http://a/v1"} if "api_key_env" in where
                                                           else {}), **where})  # fmt: skip
        message = format_validation_error(refused.value)
        assert "not the name of an environment variable" in message and "0123456789" not in message
    # A name-shaped key (letters and digits only) that no variable holds: not echoed either.
    monkeypatch.delenv("AKIAIOSFODNN7EXAMPLE", raising=False)
    with pytest.raises(UsageError) as unset:
        api_key("AKIAIOSFODNN7EXAMPLE")
    assert "AKIAIOSFODNN7EXAMPLE" not in str(unset.value)
    assert looks_like_key("AKIAIOSFODNN7EXAMPLE") and not looks_like_key("OPENAI_API_KEY")
    with pytest.raises(UsageError, match="environment variable GENSSD_NOT_SET is not set"):
        api_key("GENSSD_NOT_SET")  # a real name is still named


@pytest.mark.parametrize("args", [["--api_key", "X"], ["--api-key=X"], ["--api_k", "X"], ["--host", "0.0.0.0"],
                                  ["--port=1"], ["--config_file", "c.yaml"]])  # fmt: skip
def test_launch_extra_args_that_are_genssds_are_refused(args):
    with pytest.raises(ValidationError) as refused:
        LaunchConfig(gguf="m.gguf", extra_args=args)
    message = format_validation_error(refused.value)
    assert message.startswith("extra_args: ") and "X" not in message.removeprefix("extra_args: ")
    assert LaunchConfig(gguf="m.gguf", extra_args=["--n_gpu_layers", "-1"]).extra_args  # others pass


def test_the_shared_key_goes_only_over_https_or_to_this_machine(monkeypatch):
    monkeypatch.setenv("GENSSD_SHARED", "shared-key")
    monkeypatch.setenv("GENSSD_OWN", "own-key")
    urls = {"tls": "https://far/v1", "loop": "http://127.0.0.2:1/v1", "v6": "http://[::1]:1/v1",
            "local": "http://localhost:1/v1", "plain": "http://10.0.0.5:8000/v1", "named": "http://far:1/v1"}
    endpoints = [{"base_url": u, "name": n} for n, u in urls.items()]
    endpoints.append({"base_url": "http://far2:1/v1", "name": "own", "api_key_env": "GENSSD_OWN"})
    cfg = TeacherConfig.model_validate({"model": "m", "api_key_env": "GENSSD_SHARED", "endpoints": endpoints})
    withheld = {own.name for own in cfg.endpoints if shared_key_withheld(cfg, own)}
    assert withheld == {"plain", "named"}
    keys = {e.name: e.client.api_key for e in TeacherClient(cfg).endpoints}
    assert keys == {"tls": "shared-key", "loop": "shared-key", "v6": "shared-key", "local": "shared-key",
                    "plain": "EMPTY", "named": "EMPTY", "own": "own-key"}  # fmt: skip
    # A single base_url is the teacher's own: its key is sent whatever the scheme.
    single = TeacherConfig(model="m", base_url="http://10.0.0.5/v1", api_key_env="GENSSD_SHARED")
    assert TeacherClient(single).endpoints[0].client.api_key == "shared-key"
