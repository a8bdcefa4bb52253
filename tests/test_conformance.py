"""``kvsched bench conformance`` run whole: kvsched behind three real Envoys (one per request
body mode) in front of a simulated vLLM pool, once per ext_proc transport that is built
(2-4 s each on this 2-core machine)."""

from __future__ import annotations

from scheduler.bench.conformance import CHECKS, format_table, run_conformance


async def test_kvsched_passes_every_endpoint_picker_conformance_check(extproc_transport: str) -> None:
    results = await run_conformance(extproc_transport, workers=3)
    assert [result.name for result in results] == [name for name, _, _ in CHECKS]
    failed = [f"{result.name}: {result.detail}" for result in results if not result.passed]
    assert not failed, "\n".join(failed)
    table = format_table(results, extproc_transport)
    assert table.endswith(f"{len(CHECKS)}/{len(CHECKS)} passed")
    assert "429, x-llm-d-request-dropped-reason: " in table
