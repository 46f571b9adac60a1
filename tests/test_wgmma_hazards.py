"""scripts/wgmma_hazards.py: its walk over SASS finds a register of an issued wgmma rewritten
before the wait, on straight paths, across a loop's back-edge and on a branch, and nothing once the
wait has passed."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "wgmma_hazards.py"
spec = importlib.util.spec_from_file_location("wgmma_hazards", SCRIPT)
wh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wh)


def sass(*lines: str) -> str:
    """A function of cuobjdump -sass text, an instruction every 16 bytes."""
    body = [f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines)]
    return "\n".join(["        Function : k", *body])


def found(*lines: str) -> list[str]:
    return wh.hazards(wh.parse(sass(*lines))["k"])


RS = "QGMMA.64x8x32.F32.E4M3.E4M3 R24, R40, gdesc[UR20], RZ, !UPT, gsb0"  # D R24..R27, A R40..R43
WAIT = "WARPGROUP.DEPBAR.LE gsb0, 0x0"


def test_a_write_after_the_wait_is_fine() -> None:
    assert found("WARPGROUP.ARRIVE", RS, WAIT, "LDSM.16.M88.4 R40, [R13+UR7]", "FADD R24, R24, R1", "EXIT") == []


def test_the_a_fragment_rewritten_before_the_wait() -> None:
    hits = found(RS, "LDSM.16.M88.4 R38, [R13+UR7]", WAIT, "EXIT")  # R38..R41 overlaps R40
    assert len(hits) == 1 and "LDSM" in hits[0]


def test_an_accumulator_written_before_the_wait() -> None:
    assert len(found(RS, "IMAD R27, R2, 0x10, R3", WAIT, "EXIT")) == 1
    assert len(found(RS, "IMAD.WIDE R22, R2, 0x10, R3", WAIT, "EXIT")) == 0  # R22, R23
    assert len(found(RS, "IMAD.WIDE R23, R2, 0x10, R3", WAIT, "EXIT")) == 1  # R23, R24
    assert len(found(RS, "DADD R22, R2, R4", WAIT, "EXIT")) == 0  # a double: R22, R23
    assert len(found(RS, "F2F.F64.F32 R23, R2", WAIT, "EXIT")) == 1  # R23, R24


def test_across_the_loop_back_edge() -> None:
    # 0x00: loop head writes R41 (A of the wgmma at 0x20, issued in the iteration before) before
    # the wait at 0x10.
    hits = found("IADD3 R41, R41, 0x1, RZ", WAIT, RS, "@P0 BRA 0x0", "EXIT")
    assert len(hits) == 1 and "0x0 IADD3" in hits[0]


def test_on_one_side_of_a_branch_only() -> None:
    assert len(found(RS, "@P1 BRA 0x40", WAIT, "EXIT", "MOV R42, R1", WAIT, "EXIT")) == 1
    assert found(RS, "@P1 BRA 0x40", WAIT, "EXIT", WAIT, "MOV R42, R1", "EXIT") == []


def test_a_wait_that_leaves_one_group_pending_does_not_end_the_walk() -> None:
    assert len(found(RS, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MOV R25, R1", WAIT, "EXIT")) == 1


def test_shared_memory_operands_have_no_a_registers() -> None:
    ss = "HGMMA.64x16x16.F32.BF16 R0, gdesc[UR4], RZ, !UPT, gsb0"  # D R0..R7
    assert found(ss, "MOV R40, R1", "STS [R40], R1", "UMOV UR4, 0x1", WAIT, "EXIT") == []
    assert len(found(ss, "MOV R7, R1", WAIT, "EXIT")) == 1
