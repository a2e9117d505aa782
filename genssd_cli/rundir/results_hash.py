"""The settings that decide what a run produces, and their hash: a resume, a cache hit or a
comparison with other such settings is caught by it (`config.yaml`'s "results hash")."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from genssd_cli.config import RunConfig
from genssd_cli.redact import redact

# Settings that do not change what the run produces: where the teacher lives, how fast we go.
_NOT_RESULTS = {
    "max_cost",
    "teacher.cache",  # a hit is the same request's answer
    "teacher.price",
    "teacher.price.input",
    "teacher.price.output",
    "teacher.base_url",
    "teacher.endpoints",
    "teacher.requests_per_minute",
    "teacher.tokens_per_minute",
    "teacher.preflight",
    "teacher.logprobs",
    "teacher.api_key_env",
    "teacher.max_concurrency",
    "teacher.routing",  # where a request goes, not what it asks
    "teacher.timeout_s",
    "teacher.request_deadline_s",  # a reply past it is retried, like a timeout
    "teacher.max_reply_bytes",  # a reply past it is retried, never kept
    "teacher.retries",
    "teacher.launch.port",
    "teacher.launch.startup_timeout_s",
    "teacher.launch.extra_args",
    "student.device",
    "student.batch_tokens",
    "student.cache_mb",
    "data.limit",
}


# Result settings added later: left out while at their default, so older run directories resume.
_LATER_DEFAULTS = {
    "teacher.mode": "completions",
    "teacher.prefill": "continue_final_message",
    "teacher.system": None,
    "teacher.assistant_prefix": "",
    "prompts.teacher_chat_template": None,
    "data.steps": None,
    "data.too_long": "refuse",
    "morsd.fraction": None,
    "morsd.rows": None,
}


def results_settings(config: RunConfig, prompt_texts: dict[str, str]) -> dict[str, Any]:
    """Flat `{dotted.key: value}` of everything that changes results, prompt texts by sha256."""
    flat = _flatten(config.model_dump(mode="json"))
    flat = {k: v for k, v in flat.items() if k not in _NOT_RESULTS and not k.startswith("engine.")}
    flat = {k: v for k, v in flat.items() if k not in _LATER_DEFAULTS or _LATER_DEFAULTS[k] != v}
    # teacher.extra_body as one canonical value (flattened, an empty nested mapping would vanish); absent
    # while empty, so runs made before it existed keep their hash.
    flat = {k: v for k, v in flat.items() if not k.startswith("teacher.extra_body.")}
    if config.teacher.extra_body:
        flat["teacher.extra_body"] = json.dumps(config.teacher.extra_body, sort_keys=True, separators=(",", ":"))
    if config.teacher.mode == "completions":
        flat.pop("teacher.prefill", None)  # not used
    if config.method != "morsd":
        flat = {k: v for k, v in flat.items() if not k.startswith("morsd.")}  # not used
    for role, text in prompt_texts.items():
        flat[f"prompts.{role}.sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return flat


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def dump_config_yaml(config: RunConfig, config_hash: str) -> str:
    header = (
        "# Resolved genssd run config (API keys are never stored: only env var names).\n"
        f"# results hash: {config_hash}\n"
    )
    resolved = config.model_dump(mode="json")
    teacher = resolved["teacher"]
    for server in [teacher, *teacher["endpoints"]]:  # a password or key in a URL is not stored either
        if server.get("base_url"):
            server["base_url"] = redact(server["base_url"])
    return header + yaml.safe_dump(resolved, sort_keys=False)
