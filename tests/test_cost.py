"""The cost model: docs/model.md section 5 figures, KV bytes equal to the allocator's reservation, the
FLOP count against the paper's ratios, and the `dsv4rs cost` table, JSON and plot."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dsv4rs import cli, cost
from dsv4rs.cache import CacheConfig
from dsv4rs.cost import FLOP_COMPONENTS, BaselineModel, V4Model, compare, models
from dsv4rs.model.config import CSA, HCA, SWA

M = 1 << 20
V3_2 = BaselineModel.v3_2()
GQA8 = BaselineModel.gqa8()


def test_bytes_per_token_reproduce_spec_section_5() -> None:
    pro, flash = V4Model.pro().cost(M), V4Model.flash().cost(M)
    assert pro.compressed_bytes_per_token == 30 * 163 + 31 * 4.5625 == 5031.4375
    assert flash.compressed_bytes_per_token == 21 * 163 + 20 * 4.5625 == 3514.25
    assert pro.compressed_bytes == 5_275_844_608  # "5.28 GB"
    assert V3_2.cost(M).compressed_bytes_per_token == 61 * (656 + 132) == 48_068
    assert GQA8.cost(M).compressed_bytes_per_token == 61 * 4096
    assert round(pro.compressed_bytes_per_token / 48_068, 3) == 0.105
    assert round(flash.compressed_bytes_per_token / 48_068, 3) == 0.073
    assert round(pro.compressed_bytes_per_token / (61 * 4096), 3) == 0.020


def test_flops_at_1m_match_the_straightforward_count_of_spec_section_5() -> None:
    base = V3_2.cost(M).total_flops
    assert V4Model.pro().cost(M).total_flops / base == pytest.approx(0.26, abs=0.005)
    assert V4Model.flash().cost(M).total_flops / base == pytest.approx(0.12, abs=0.005)


def test_flops_components() -> None:
    pro = V4Model.pro()
    f = pro.flops(M)
    assert tuple(f) == FLOP_COMPONENTS
    # 30 CSA layers score floor(L / 4) keys with 64 heads of 128 (plus their projections).
    params = pro.active_params()
    assert f["indexer"] == 2 * params["indexer"] + 30 * 2 * 64 * 128 * (M // 4)
    # Core attention: window + top-1024 on CSA layers, window + L / 128 on HCA layers.
    assert f["attention"] == 4 * 128 * 512 * (30 * (128 + 1024) + 31 * (128 + M // 128))
    assert pro.candidates(CSA, 100) == 100 + 25 and pro.candidates(HCA, 100) == 100 and pro.candidates(SWA, M) == 128
    # The published active parameters (49 B and 13 B) include the embedding, which is a lookup.
    assert sum(params.values()) + 129280 * 7168 == pytest.approx(49e9, rel=0.02)
    flash = V4Model.flash().active_params()
    assert sum(flash.values()) + 129280 * 4096 == pytest.approx(13e9, rel=0.07)
    assert sum(BaselineModel.mla().active_params().values()) + 129280 * 7168 == pytest.approx(37e9, rel=0.02)
    # Without an indexer, dense attention grows with every token.
    mla = BaselineModel.mla()
    assert mla.flops(2 * M)["attention"] == 2 * mla.flops(M)["attention"]


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="context"):
        V4Model.pro().cost(0)
    with pytest.raises(ValueError, match="context"):
        V3_2.flops(-5)
    with pytest.raises(ValueError, match="main_format"):
        V4Model.pro(main_format="fp16")
    with pytest.raises(ValueError, match="index_format"):
        models(index_format="int8")
    with pytest.raises(ValueError, match="contexts"):
        compare(())


def test_cli_table(capsys) -> None:
    assert cli.main(["cost"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "GFLOP/tok" in lines[0] and "KV B/tok" in lines[0]
    pro_1m = next(line for line in lines if line.startswith("v4-pro") and " 1M " in line)
    assert "26.2%" in pro_1m and "10.5%" in pro_1m and "2.0%" in pro_1m and "5,031.4" in pro_1m
    flash_1m = next(line for line in lines if line.startswith("v4-flash") and " 1M " in line)
    assert "12.1%" in flash_1m and "7.3%" in flash_1m and "3,514.2" in flash_1m
    assert "27% in the paper" in out and "10% in the paper" in out
    table = lines[2 : lines.index("")]
    assert [line.split()[:2] for line in table] == [
        [m.name, label] for m in models() for label in ("4K", "64K", "128K", "1M")
    ]


def test_cli_json(capsys) -> None:
    assert cli.main(["cost", "--json", "--context", "5000", "--index-format", "fp8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["v4-pro", "v4-flash", "v3.2", "v3-mla", "gqa-8"]
    pro = rows[0]
    assert pro["context"] == 5000
    assert pro["kv_bytes"] == dataclasses.asdict(CacheConfig.v4_pro(index_format="fp8").footprint(5000))
    assert pro["total_flops"] == sum(pro["flops"].values())
    assert rows[2]["flops_vs_v3.2"] == rows[4]["flops_vs_gqa-8"] == 1.0


def test_cli_plot(tmp_path, capsys) -> None:
    path = tmp_path / "cost.png"
    assert cli.main(["cost", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert len(data) > 10_000 and data.startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_bad_context_names_the_argument(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["cost", "--context", "0"])
    assert e.value.code == 2
    assert "context: expected a positive number of tokens (below 2^63), got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("call", "error", "name"), [
    (lambda: cost.compare([10**30]), ValueError, "context"),  # was the binding's OverflowError
    (lambda: cost.compare([1.5]), ValueError, "context"),
    (lambda: cost.plot(None), TypeError, "path"),
])
def test_bad_arguments_name_themselves(call, error: type, name: str) -> None:
    with pytest.raises(error, match=f"^{name}: "):
        call()
    assert cost.compare([2**63 - 1])[0]["context"] == 2**63 - 1  # the largest context is exact
