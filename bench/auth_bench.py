"""What authentication costs a request: GET one feature group in process (Flask's test client, SQLite), with
TM_AUTH=none, token and oidc side by side, in interleaved rounds; CPU time per request and its ratio to none.

The OIDC issuer is the tests' local one (tests/test_oidc.py: a JWKS of an RSA-2048 key, RS256 tokens); its keys are
fetched once, before timing, as a serving process would have them cached.

    .venv/bin/python bench/auth_bench.py                 # 3 rounds of 2000 requests per mode
    .venv/bin/python bench/auth_bench.py --rounds 5 --requests 5000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_oidc import AUDIENCE, ROLE_MAP, IdentityProvider  # noqa: E402
from trainingmgr import create_app  # noqa: E402
from trainingmgr.adapters.api_tokens import add_token  # noqa: E402
from trainingmgr.adapters.base import RoleMap  # noqa: E402
from trainingmgr.config import Settings  # noqa: E402
from trainingmgr.schema import upgrade  # noqa: E402

PATH = "/ai-ml-model-training/v1/featureGroup/bench_fg"


def clients(folder: Path, idp: IdentityProvider) -> dict[str, tuple]:
    base = Settings(data_dir=str(folder), secret_key="bench", log_level="WARNING")
    app = create_app(base)
    upgrade(app)
    created = app.test_client().post("/ai-ml-model-training/v1/featureGroup", json={
        "featuregroup_name": "bench_fg", "feature_list": "a,b", "datalake_source": "CsvSource",
        "measurement": "cell_kpis.csv", "enable_dme": False})
    assert created.status_code == 201, created.get_json()
    token = add_token(folder / "api-tokens", "bench", "reader", RoleMap())
    modes = {
        "none": (app, None),
        "token": (create_app(base.replace(auth="token", auth_tokens_file=str(folder / "api-tokens"))), token),
        "oidc": (create_app(base.replace(auth="oidc", oidc_issuer=idp.issuer, oidc_audience=AUDIENCE,
                                         auth_role_map=ROLE_MAP)), idp.token("reader")),
    }
    result = {}
    for mode, (mode_app, credential) in modes.items():
        client = mode_app.test_client()
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        assert client.get(PATH, headers=headers).status_code == 200, mode  # warm: keys fetched, file read
        result[mode] = (client, headers)
    return result


def cpu_per_request(client, headers: dict[str, str], requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        client.get(PATH, headers=headers)
    return (time.process_time() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    idp = IdentityProvider()
    try:
        with tempfile.TemporaryDirectory() as folder:
            modes = clients(Path(folder), idp)
            figures: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode, (client, headers) in modes.items():
                    figures[mode].append(cpu_per_request(client, headers, args.requests))
    finally:
        idp.stop()
    none = statistics.median(figures["none"])
    print(f"GET one feature group in process, {args.rounds} rounds x {args.requests} requests, median CPU per request")
    print(f"{'TM_AUTH':8} {'CPU us/request':>15} {'ratio to none':>14} {'added us':>9}")
    for mode, values in figures.items():
        median = statistics.median(values)
        print(f"{mode:8} {median * 1e6:15.0f} {median / none:14.2f} {(median - none) * 1e6:9.0f}")


if __name__ == "__main__":
    main()
