"""The demo: a Consul agent, several twistd servers of the demo model, real requests and answers.

Run through ``scripts/demo``, which bootstraps first and then runs ``python -m scripts.demo``
from the repository root. Without ``--check`` it keeps serving until Ctrl-C; with
``--check`` it runs the examples, checks every answer and exits 0 (all good) or 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.ports import free_port, is_free
from harness.twistd import REPO, TwistdServer

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)


def sample_request(png: Path, out: Path) -> Path:
    """Write the TF Serving row-format request for one sample digit: 28×28×1 floats in [0, 1]."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
    out.write_text(json.dumps({"instances": [pixels[:, :, None].round(4).tolist()]}))
    return out


def curl(*args: str) -> tuple[int, str]:
    command = ["curl", "-sS", "-w", "\n%{http_code}", *args]
    print(f"$ {shlex.join(command[:1] + list(args))}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def run_examples(server: TwistdServer, checks: Checks) -> None:
    samples = REPO / "samples"
    url = server.url
    print("\n== predict (TF Serving REST, row format) with curl")
    request = sample_request(samples / "seven.png", REPO / "samples" / "seven.json")
    code, body = curl("-d", f"@{request.relative_to(REPO)}", f"{url}/v1/models/digits:predict")
    print(_short(body))
    answer = json.loads(body) if code == 200 else {}
    probabilities = answer.get("predictions", [[0] * 10])[0]
    checks.expect(
        code == 200 and int(np.argmax(probabilities)) == 7,
        "the demo model reads samples/seven.png as 7",
    )

    print("\n== every sample digit, one request each")
    right = 0
    for digit, name in enumerate(DIGITS):
        request = sample_request(
            samples / f"{name}.png", Path("/tmp") / f"kleinserve-demo-{name}.json"
        )
        status, answer = server.post_json(
            "/v1/models/digits:predict", json.loads(request.read_text())
        )
        label = int(np.argmax(answer["predictions"][0])) if status == 200 else None
        right += label == digit
        print(f"  {name}.png → {label}")
    checks.expect(right >= 8, f"{right}/10 sample digits classified right")

    print("\n== image upload: curl -F answers with top-k labels")
    code, body = curl("-F", "data=@samples/seven.png", f"{url}/")
    print(body)
    top = json.loads(body)["predictions"][0]["label"] if code == 200 else None
    checks.expect(top == "7", "curl -F data=@samples/seven.png answers label 7 first")
    code, body = curl(
        "-F", "data=@samples/three.png", "-F", "data=@samples/nine.png", "-F", "top_k=2",
        f"{url}/v1/models/digits:classify_image",
    )  # fmt: skip
    print(body)
    labels = (
        [r["predictions"][0]["label"] for r in json.loads(body).get("results", [])]
        if code == 200
        else []
    )
    checks.expect(labels == ["3", "9"], "two files in one request, answered in order")
    code, body = curl("-F", "data=@README.md", f"{url}/")
    print(body)
    checks.expect(code == 415, "a file that is not an image → 415")

    print("\n== model status and metadata")
    code, body = curl(f"{url}/v1/models/digits")
    print(body)
    checks.expect(code == 200 and '"AVAILABLE"' in body, "status says version 1 is AVAILABLE")
    code, body = curl(f"{url}/v1/models/digits/metadata")
    print(_short(body, 400))
    checks.expect(
        code == 200 and '"serving_default"' in body, "metadata shows the serving_default signature"
    )

    print("\n== bad input gets a clear 4xx, and the server keeps serving")
    code, body = curl("-d", '{"instances": [[1, 2]', f"{url}/v1/models/digits:predict")
    print(body)
    checks.expect(code == 400 and '"error"' in body, "malformed JSON → 400 with an error message")
    code, body = curl("-d", '{"instances": [[1, 2]]}', f"{url}/v1/models/digits:predict")
    print(body)
    checks.expect(code == 400, "wrong shape → 400")
    code, body = curl("-d", '{"instances": [1]}', f"{url}/v1/models/nosuchmodel:predict")
    print(body)
    checks.expect(code == 404, "unknown model → 404")
    checks.expect(server.get("/readyz")[0] == 200, "still ready after the bad requests")


MODEL_CONFIG = """\
model_config_list {{
  config {{ name: 'digits' base_path: '{base}' model_platform: 'tensorflow'{labels} }}
  config {{ name: 'digit_words' base_path: '{words}' model_platform: 'tensorflow' }}
}}
"""


def write_model_config(path: Path, base: Path, labels: str = "") -> None:
    """digits (its versions in ``base``), and digit_words beside it: the same model with the
    hooks of examples/hooks/digit_labels."""
    words = base.parent / "digit_words"
    path.write_text(MODEL_CONFIG.format(base=base, labels=labels, words=words))


def make_digit_words(base: Path) -> None:
    """digit_words: version 1 of digits with examples/hooks/digit_labels as its hooks file."""
    words = base.parent / "digit_words"
    shutil.rmtree(words, ignore_errors=True)
    shutil.copytree(base / "1", words / "1")
    hooks = words / "1" / "assets.extra" / "kleinserve_hooks.py"
    hooks.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "examples" / "hooks" / "digit_labels" / "kleinserve_hooks.py", hooks)


def show_hooks(server: TwistdServer, checks: Checks) -> None:
    print(
        "\n== your own Python around the model: examples/hooks/digit_labels as digit_words's "
        "hooks\n   (a picture in, decoded in the hook; batched; a business answer out)"
    )
    code, body = curl(
        "-F", "data=@samples/seven.png", f"{server.url}/v1/models/digit_words:invoke"
    )  # fmt: skip
    print(body)
    answer = json.loads(body) if code == 200 else {}
    checks.expect(answer.get("digit") == "seven", "the hook answers seven for samples/seven.png")
    code, body = curl(
        "-H", "Content-Type: text/plain", "--data-binary", "not a picture",
        f"{server.url}/v1/models/digit_words:invoke",
    )  # fmt: skip
    print(body)
    checks.expect(
        code == 400 and "hook preprocess of model 'digit_words'" in body,
        "a body the hook refuses → 400 naming the hook and the version",
    )


def show_lifecycle(
    servers: list[TwistdServer], config: Path, base: Path, consul: ConsulAgent, checks: Checks
) -> None:
    """A new version dropped in while serving, then a label set by editing the config + SIGHUP."""
    server = servers[0]
    print("\n== model lifecycle: a new version arrives while the servers are under load")
    request = json.loads((REPO / "samples" / "seven.json").read_text())
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            codes.append(server.post_json("/v1/models/digits:predict", request)[0])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    print(
        f"$ cp -r {base.relative_to(REPO)}/1 {base.relative_to(REPO)}/2      # (4 threads keep calling :predict)"
    )
    copied = time.monotonic()
    shutil.copytree(base / "1", base / "2")
    seen: list[str] = []
    deadline = time.monotonic() + 60
    states = ""
    while time.monotonic() < deadline:
        status = server.get("/v1/models/digits")[1]
        states = ", ".join(
            f"{v['version']}: {v['state']}" for v in status.get("model_version_status", [])
        )
        if not seen or seen[-1] != states:
            seen.append(states)
            print(f"  {time.monotonic() - copied:5.2f} s  {states}")
        if states == "2: AVAILABLE, 1: END":
            break
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join()
    failed = sum(code != 200 for code in codes)
    print(f"  {len(codes)} requests during the swap, {failed} failed")
    checks.expect(
        states == "2: AVAILABLE, 1: END", "version 2 took over and version 1 was unloaded"
    )
    checks.expect(
        failed == 0 and len(codes) > 0, f"no request failed during the swap ({len(codes)} sent)"
    )

    print("\n== version labels: edit the config file and send SIGHUP")
    write_model_config(config, base, "\n           version_labels { key: 'stable' value: 2 }")
    print(config.read_text().rstrip())
    print("$ kill -HUP " + " ".join(str(s.process.pid) for s in servers if s.process))
    for s in servers:
        if s.process is not None:
            os.kill(s.process.pid, signal.SIGHUP)
    for _ in range(50):  # the reload happens on each server's reactor, a moment after the signal
        if all(s.get("/v1/models/digits/labels/stable")[0] == 200 for s in servers):
            break
        time.sleep(0.1)
    code, body = curl(f"{server.url}/v1/models/digits/labels/stable/metadata")
    print(_short(body, 120))
    checks.expect(code == 200 and '"version":"2"' in body, "/labels/stable answers from version 2")
    code, body = curl(
        "-d", "@samples/seven.json", f"{server.url}/v1/models/digits/labels/beta:predict"
    )
    print(body)
    checks.expect(
        code == 400 and "Unrecognized servable version label" in body, "an unknown label → 400"
    )
    tags: list[str] = []
    for _ in range(50):
        services = consul.get("/v1/catalog/service/inference")[2]
        tags = sorted({t for entry in services for t in entry["ServiceTags"]})
        if "model:digits:2" in tags and "model:digits:1" not in tags:
            break
        time.sleep(0.1)
    print(f"  Consul tags now: {', '.join(tags)}")
    checks.expect(
        "model:digits:2" in tags and "model:digits:1" not in tags, "Consul tags name version 2 only"
    )


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} bytes)"


def show_discovery(consul: ConsulAgent, servers: list[TwistdServer], checks: Checks) -> None:
    print("\n== discovery: every server registered itself in Consul")
    env = {"CONSUL_HTTP_ADDR": consul.http_addr, "PATH": str(CONSUL_BINARY.parent)}
    print(f"$ CONSUL_HTTP_ADDR={consul.http_addr} consul catalog services -tags")
    print(
        subprocess.run(
            ["consul", "catalog", "services", "-tags"], env=env, capture_output=True, text=True
        ).stdout
    )
    deadline = time.monotonic() + 30
    passing: list = []
    while time.monotonic() < deadline:
        _, _, passing = consul.get("/v1/health/service/inference?passing")
        if len(passing) == len(servers):
            break
        time.sleep(0.5)
    print(
        f"$ curl {consul.http_addr}/v1/health/service/inference?passing   (one entry per healthy server)"
    )
    for entry in passing:
        service = entry["Service"]
        states = ", ".join(f"{c['Name'] or c['CheckID']}: {c['Status']}" for c in entry["Checks"])
        print(f"  {service['ID']:32} {service['Address']}:{service['Port']}  {states}")
    checks.expect(
        len(passing) == len(servers), f"{len(passing)}/{len(servers)} servers passing in Consul"
    )


def show_client(consul: ConsulAgent, servers: list[TwistdServer], checks: Checks) -> None:
    from client import InferenceClient

    print("\n== the client library: servers from Consul, called directly (no proxy)")
    print(f">>> c = InferenceClient(consul={consul.http_addr!r})")
    print(
        ">>> c.predict('digits', images)   # the ten sample digits, one array of shape (10, 28, 28, 1)"
    )
    images = np.stack(
        [
            np.asarray(Image.open(REPO / "samples" / f"{name}.png").convert("L"), np.float32)[
                :, :, None
            ]
            / 255
            for name in DIGITS
        ]
    )
    with InferenceClient(consul=consul.http_addr) as c:
        probabilities = c.predict("digits", images)
        labels = probabilities.argmax(axis=1).tolist()
        print(
            f"{type(probabilities).__name__} {probabilities.dtype} {probabilities.shape}; argmax → {labels}"
        )
        right = sum(label == digit for digit, label in enumerate(labels))
        checks.expect(
            probabilities.dtype == np.float32 and right >= 8,
            f"client: float32 answers, {right}/10 right",
        )
        before = [_served(s) for s in servers]
        for _ in range(30):
            c.predict("digits", images[:1])
        spread = [_served(s) - b for s, b in zip(servers, before, strict=True)]
        print(f"30 more calls, served per server (from each server's /metrics): {spread}")
        checks.expect(
            sum(1 for n in spread if n > 0) >= 2, "the calls were spread over several servers"
        )

    env = {**os.environ, "CONSUL_HTTP_ADDR": consul.http_addr}
    for args in (
        ["backends"],
        ["predict", "digits", "--json", "@samples/seven.json"],
        ["classify", "--model", "digits", "--top-k", "1", "samples/"],
    ):
        print(f"\n$ inference-client {shlex.join(args)}")
        done = subprocess.run(
            [str(REPO / ".venv" / "bin" / "inference-client"), *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        print(_short(done.stdout.strip() or done.stderr.strip(), 900))
        checks.expect(done.returncode == 0, f"inference-client {args[0]} exits 0")


def _served(server: TwistdServer) -> int:
    """Inference requests this server answered with 200, from its own /metrics: TF Serving's
    :predict and the Open Inference Protocol's infer (which the client sends by default)."""
    _, text = server.get("/metrics")
    served = 0
    for line in str(text).splitlines():
        if (
            line.startswith("kleinserve_requests_total{")
            and ('route="predict"' in line or 'route="v2_infer"' in line)
            and 'code="200"' in line
        ):
            served += int(float(line.rsplit(" ", 1)[1]))
    return served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="run the examples, check the answers, exit 0/1"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="first server's REST port (default: 8501 if free)"
    )
    parser.add_argument(
        "--servers", type=int, default=3, help="how many servers to start (default 3)"
    )
    args = parser.parse_args()

    logs = REPO / ".cache" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    consul = ConsulAgent(CONSUL_BINARY, logs)
    print(f"== starting a Consul dev agent on {consul.http_addr}")
    consul.start()
    first = args.port or (8501 if is_free(8501) else free_port())
    # The servers serve a copy of the demo model, so the demo can drop a version 2 into it.
    base = logs / "models" / "digits"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(REPO / "models" / "digits" / "1", base / "1")
    make_digit_words(base)
    config = logs / "models.config"
    write_model_config(config, base)
    servers = []
    for n in range(args.servers):
        port = first if n == 0 else free_port()
        flags = [
            f"--model_config_file={config}",
            "--file_system_poll_wait_seconds=0.5",
            "--enable_batching",
            "--enable_model_hooks",
            "--default_model=digits",  # what POST / classifies (two models are served)
            f"--consul={consul.http_addr}",
            "--consul_check_interval=1",
            "--drain_delay=1",
        ]
        servers.append(TwistdServer(flags, logs, port=port))
        print(
            f"== starting: twistd -n inference {' '.join(flags[:5])} --consul={consul.http_addr} "
            f"--rest_api_port={port}"
        )
    print(config.read_text().rstrip())
    started = time.monotonic()
    for server in servers:
        server.start()
    checks = Checks()
    try:
        for server in servers:
            server.wait_ready()
        print(
            f"   {len(servers)} servers ready in {time.monotonic() - started:.1f} s; logs in {logs.relative_to(REPO)}"
        )
        run_examples(servers[0], checks)
        show_hooks(servers[0], checks)
        show_discovery(consul, servers, checks)
        show_client(consul, servers, checks)
        show_lifecycle(servers, config, base, consul, checks)
        if args.check:
            print(
                f"\n{'all checks passed' if not checks.failures else 'FAILED: ' + '; '.join(checks.failures)}"
            )
            return 1 if checks.failures else 0
        print(f"""
== serving until Ctrl-C. Try:
  curl -d @samples/seven.json {servers[0].url}/v1/models/digits:predict
  curl -F data=@samples/seven.png {servers[0].url}/
  curl -F data=@samples/three.png -F top_k=3 {servers[0].url}/v1/models/digits:classify_image
  curl -F data=@samples/four.png {servers[0].url}/v1/models/digit_words:invoke
  curl {servers[0].url}/v1/models/digits
  curl {servers[0].url}/v1/models/digits/labels/stable/metadata
  cp -r {base}/2 {base}/3      # picked up while serving
  kill -HUP <pid>              # after editing {config}
  curl {servers[0].url}/metrics
  CONSUL_HTTP_ADDR={consul.http_addr} .tools/bin/consul catalog services -tags
  curl '{consul.http_addr}/v1/health/service/inference?passing'
""")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(s.process is not None and s.process.poll() is None for s in servers):
            time.sleep(0.5)
        print(
            "a server stopped:",
            *(s.log()[-2000:] for s in servers if s.process and s.process.poll() is not None),
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()
        consul.stop()


if __name__ == "__main__":
    sys.exit(main())
