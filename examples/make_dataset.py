"""Writes examples/data/cell_kpis.csv: a small synthetic, deterministic O-RAN cell-KPI dataset.

    python examples/make_dataset.py [OUTPUT_CSV]

5 cells x 400 quarter-hours (about 4 days) = 2,000 rows, one row per cell and 15-minute period, in the shape of
the performance-management counters a near-RT RIC collects per cell:

| column | unit | meaning |
| --- | --- | --- |
| time | ISO 8601, UTC | start of the 15-minute period |
| cellId | | the cell, "S<site>/B<band>/C<cell>" |
| prbUsageDl, prbUsageUl | % | physical resource blocks in use, downlink / uplink |
| activeUes | count | mean number of active UEs |
| pdcpBytesDl, pdcpBytesUl | bytes | PDCP volume in the period, downlink / uplink |
| rsrpMean | dBm | mean reference-signal received power reported by the UEs |
| sinrMean | dB | mean signal-to-interference-plus-noise ratio reported by the UEs |
| throughputDl | Mbit/s | mean downlink throughput per active UE: the regression target (a QoE indicator) |

The load follows a daily pattern per cell; the radio quality (RSRP, SINR) depends on the cell and drops with load
(interference); the per-UE throughput grows with SINR and RSRP and falls as the cell fills (PRB usage, active UEs), with
multiplicative noise: a linear model explains about 80 % of its variance.
The same seed always gives byte-identical output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240611
PERIODS = 400  # quarter-hours per cell
START = "2024-06-03T00:00:00Z"
OUTPUT = Path(__file__).resolve().parent / "data" / "cell_kpis.csv"

# cellId, peak active UEs, mean RSRP (dBm), mean SINR (dB), carrier capacity (Mbit/s)
CELLS = [
    ("S1/B13/C1", 40, -86.0, 17.0, 300.0),
    ("S1/B13/C2", 28, -92.0, 13.0, 300.0),
    ("S1/B13/C3", 18, -98.0, 9.0, 300.0),
    ("S2/B2/C1", 34, -90.0, 15.0, 200.0),
    ("S7/B4/C2", 12, -103.0, 6.0, 150.0),
]


def make(seed: int = SEED) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    times = pd.date_range(START, periods=PERIODS, freq="15min")
    hour = times.hour.to_numpy() + times.minute.to_numpy() / 60.0
    # Daily load: quiet at night, a morning rise and an evening peak; 0.1 .. 1.0.
    daily = 0.1 + 0.9 * np.clip(
        0.55 * np.exp(-((hour - 11.0) ** 2) / 18.0) + 0.75 * np.exp(-((hour - 19.5) ** 2) / 8.0), 0, 1
    )
    frames = []
    for cell_id, peak_ues, rsrp_base, sinr_base, capacity in CELLS:
        load = np.clip(daily * rng.normal(1.0, 0.12, PERIODS), 0.03, 1.2)
        ues = np.maximum(rng.poisson(peak_ues * load), 1)
        prb_dl = np.clip(100.0 * (1 - np.exp(-ues / (0.55 * peak_ues))) + rng.normal(0, 4, PERIODS), 1, 100)
        prb_ul = np.clip(0.45 * prb_dl + rng.normal(0, 3, PERIODS), 0.5, 100)
        rsrp = rsrp_base + rng.normal(0, 2.5, PERIODS) - 2.0 * load
        sinr = sinr_base - 6.0 * (prb_dl / 100.0) + 0.15 * (rsrp - rsrp_base) + rng.normal(0, 1.5, PERIODS)
        # Spectral efficiency from SINR (Shannon, capped), shared by the active UEs.
        efficiency = np.minimum(np.log2(1 + 10 ** (sinr / 10.0)), 7.0) / 7.0
        throughput = (
            capacity * efficiency * (1.0 - 0.6 * prb_dl / 100.0) / (1.0 + 0.04 * ues) * rng.lognormal(0, 0.08, PERIODS)
        )
        throughput = np.clip(throughput, 0.2, None)
        seconds = 900.0
        demand = rng.uniform(0.25, 0.6, PERIODS)  # share of the period the UEs actually transfer data
        pdcp_dl = throughput * 1e6 / 8 * seconds * ues * demand
        pdcp_ul = pdcp_dl * rng.uniform(0.08, 0.16, PERIODS)
        frames.append(
            pd.DataFrame(
                {
                    "time": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "cellId": cell_id,
                    "prbUsageDl": prb_dl.round(2),
                    "prbUsageUl": prb_ul.round(2),
                    "activeUes": ues.astype(int),
                    "pdcpBytesDl": pdcp_dl.round().astype(np.int64),
                    "pdcpBytesUl": pdcp_ul.round().astype(np.int64),
                    "rsrpMean": rsrp.round(1),
                    "sinrMean": sinr.round(2),
                    "throughputDl": throughput.round(3),
                }
            )
        )
    return pd.concat(frames).sort_values(["time", "cellId"], kind="stable").reset_index(drop=True)


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    frame = make()
    frame.to_csv(output, index=False, lineterminator="\n")
    print(f"wrote {len(frame)} rows to {output}")


if __name__ == "__main__":
    main()
