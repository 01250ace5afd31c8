"""`make gpu-check` (scripts/gpu_check.py) without a GPU: it says so, installs nothing and exits 0; what it does
on a GPU machine up to vLLM itself runs here for real on the CPU.

Nothing here needs a GPU or vLLM. Which nvidia-smi the script asks is always given (a missing path, or a small
stand-in script for a broken driver or a listed GPU), so these tests behave the same on a GPU machine and
never install the gpu extra. The agent task and the measurement through the worker run against a real
nats-server, the real agent-runner and the real inference-worker, with the scripted engine in vLLM's place."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from deploy.manifests import REPO_ROOT
from tokenizers import Tokenizer

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"
MAKEFILE = REPO_ROOT / "Makefile"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


def _recording_uv(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """A stand-in for uv that writes down its arguments: the proof that nothing was (or what would be) installed."""
    log = tmp_path / "uv-calls.txt"
    return _executable(tmp_path / "uv", f'echo "$@" >> "{log}"\nexit {exit_code}\n'), log


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT
    )


def test_without_nvidia_smi_it_says_so_installs_nothing_and_exits_0(tmp_path: Path) -> None:
    uv, log = _recording_uv(tmp_path, 0)
    result = _check("--nvidia-smi", str(tmp_path / "no-such-dir" / "nvidia-smi"), "--uv", str(uv))
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU" in result.stdout
    assert "nothing was installed" in result.stdout
    assert not log.exists(), "uv was called without a GPU"


def test_a_driver_that_lists_no_gpu_counts_as_no_gpu(tmp_path: Path) -> None:
    uv, log = _recording_uv(tmp_path, 0)
    broken = _executable(
        tmp_path / "nvidia-smi",
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n',
    )
    result = _check("--nvidia-smi", str(broken), "--uv", str(uv))
    assert result.returncode == 0
    assert "no NVIDIA GPU" in result.stdout
    assert not log.exists()


def test_with_a_gpu_listed_it_first_installs_the_locked_gpu_extra(tmp_path: Path) -> None:
    uv, log = _recording_uv(tmp_path, 3)
    gpu = _executable(tmp_path / "nvidia-smi", 'echo "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15"\n')
    result = _check("--nvidia-smi", str(gpu), "--uv", str(uv))
    assert "NVIDIA H100 80GB HBM3" in result.stdout
    assert log.read_text(encoding="utf-8").splitlines() == ["sync --frozen --all-packages --extra gpu"]
    assert result.returncode == 3, "a failed install stops the check with its exit status"


def test_make_gpu_check_runs_the_script_and_make_test_does_not() -> None:
    makefile = MAKEFILE.read_text(encoding="utf-8")
    target = re.search(r"^gpu-check:.*\n\t(.+)$", makefile, re.M)
    assert target is not None, "the Makefile has no gpu-check target"
    assert "scripts/gpu_check.py" in target.group(1)
    test_target = re.search(r"^test:(.*)$", makefile, re.M)
    assert test_target is not None
    assert "gpu-check" not in test_target.group(1)


def test_the_dummy_model_is_a_tokenizer_and_config_vllm_can_load(tmp_path: Path) -> None:
    folder = gpu_check.write_dummy_model(tmp_path / "dummy")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in gpu_check.DUMMY_TOKENS}
    assert all(isinstance(i, int) for i in ids.values())
    assert config["vocab_size"] >= tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["vocab_size"] % 64 == 0
    assert config["eos_token_id"] == ids["<|im_end|>"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == ids["<|im_end|>"]
    assert "tools" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert not (folder / "model.safetensors").exists(), "dummy weights: vLLM makes them up"

    encoded = tokenizer.encode('<|im_start|>assistant\n<tool_call>\n{"name": "calculator"}\n</tool_call><|im_end|>')
    assert encoded.ids[0] == ids["<|im_start|>"], "no [CLS] wrapping: the chat template decides every token"
    assert encoded.ids[-1] == ids["<|im_end|>"]
    assert ids["<tool_call>"] in encoded.ids
    assert len(tokenizer.encode("hi").ids) == 1, "no padding to MiniLM's 128"
    # The tool-call markers are not special, so decoding keeps them for the hermes parser to find.
    assert "<tool_call>" in tokenizer.decode(encoded.ids, skip_special_tokens=True)
    assert "<|im_start|>" not in tokenizer.decode(encoded.ids, skip_special_tokens=True)


def test_the_tool_parser_is_guessed_from_the_model_family_or_must_be_named() -> None:
    assert gpu_check.guess_tool_parser("Qwen/Qwen2.5-7B-Instruct") == "hermes"
    assert gpu_check.guess_tool_parser("meta-llama/Llama-3.1-8B-Instruct") == "llama3_json"
    assert gpu_check.guess_tool_parser("/models/my-finetune") is None


def _scripted_worker(plan: Any, args: argparse.Namespace, nats_url: str) -> Any:
    from agentbus.inference_worker.settings import WorkerSettings

    return WorkerSettings(
        nats_url=nats_url,
        engine="scripted",
        models=[gpu_check.MODEL_SUBJECT],
        max_concurrency=args.concurrency,
        fetch_batch=args.concurrency,
        drain_timeout_seconds=2,
        log_level="WARNING",
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker phase as on a GPU node, with the scripted engine in vLLM's place: the agent task (the scripted
    engine calls the tool it reads in the input) and the prompts sent through the worker."""
    import asyncio

    args = argparse.Namespace(requests=12, concurrency=4, max_tokens=64, warmup=2, timeout_seconds=60.0)
    plan = gpu_check.ModelPlan("scripted", "hermes", {}, "named", "the scripted engine")
    result: dict[str, Any] = asyncio.run(
        gpu_check.measure_through_the_worker(
            plan,
            args,
            tmp_path_factory.mktemp("gpu-check"),
            worker_settings=_scripted_worker,
            task_input=f"calculator(1234*5678) {gpu_check.TASK_INPUT}",
        )
    )
    return result


def test_the_agent_task_calls_the_calculator_through_runner_and_worker(measured: dict[str, Any]) -> None:
    agent = measured["agent"]
    assert agent["kinds"][0] == "accepted"
    assert agent["kinds"][-1] == "completed"
    assert [c["name"] for c in agent["tool_calls"]] == ["calculator"]
    assert gpu_check.TASK_ANSWER in agent["output"]
    assert gpu_check.agent_verdict(agent, random_weights=False) == (
        True,
        "completed, with the calculator called and its result in the answer",
    )


def test_real_weights_that_answer_without_the_tool_fail_and_random_weights_do_not() -> None:
    no_tool = {"kinds": ["accepted", "step", "completed"], "tool_calls": [], "output": "7006652", "error": None}
    ok, why = gpu_check.agent_verdict(no_tool, random_weights=False)
    assert not ok
    assert "without calling the calculator" in why
    assert gpu_check.agent_verdict(no_tool, random_weights=True)[0]
    failed = {"kinds": ["accepted", "failed"], "tool_calls": [], "output": None, "error": "llm_error: boom"}
    assert not gpu_check.agent_verdict(failed, random_weights=True)[0]


def test_the_prompts_go_through_the_worker_and_every_one_comes_back(measured: dict[str, Any]) -> None:
    throughput = measured["throughput"]
    assert throughput["errors"] == []
    assert throughput["requests"] == 12
    assert throughput["completion_tokens"] > 0
    assert throughput["seconds"] > 0


def test_the_report_prints_both_rates_and_their_ratio(
    measured: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = gpu_check.ModelPlan("m", "hermes", {"max_model_len": 4096}, "named", "m (named)")
    direct = {"throughput": {**measured["throughput"], "seconds": measured["throughput"]["seconds"] / 2}}
    assert gpu_check.report(["NVIDIA H100, 81559 MiB, 550"], plan, direct, measured, 64) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(vLLM directly|through the worker):\s+([\d.]+) tokens/s", out)}
    assert rates["vLLM directly"] == pytest.approx(2 * rates["through the worker"], rel=0.01)
    ratio = re.search(r"ratio worker/direct:\s+([\d.]+)", out)
    assert ratio is not None
    assert float(ratio.group(1)) == pytest.approx(0.5, abs=0.01)
    assert "PASS" in out
