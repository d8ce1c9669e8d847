"""torch.compile of the backbone (issue 12 item 8): no graph break in the forward, same features."""

from __future__ import annotations

import torch

from diffperc import create_backbone


def test_compiled_forward_has_no_graph_breaks_and_matches_eager() -> None:
    torch._dynamo.reset()
    bb = create_backbone("test_sd", layers=["up_blocks.1", "up_blocks.2.resnets.0:input"], attention=True,
                         timestep=100)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    eager = bb(images, noise=noise)  # measures feature_info and caches the empty prompt's embedding
    explain = torch._dynamo.explain(bb)(images, noise=noise)
    assert explain.graph_break_count == 0, [str(r.reason)[:200] for r in explain.break_reasons]
    assert explain.graph_count == 1
    compiled = torch.compile(bb, backend="eager", fullgraph=True)  # dynamo capture; fullgraph raises on a break
    out = compiled(images, noise=noise)
    for a, b in zip(out.features, eager.features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out.attention.keys() == eager.attention.keys()
    for r in eager.attention:
        torch.testing.assert_close(out.attention[r], eager.attention[r], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
