"""CoCa heads: pooler and decoder shapes and masking, a tiny head + decoder that overfits 4 captions, open_clip CoCa."""

import pytest
import torch
import torch.nn.functional as F

from mmalign.heads import AttentionalPooler, CocaHead, CocaTextDecoder, generate, open_clip_coca
from mmalign.losses import AlignmentOutput, CaptionTargets, build_loss
from mmalign.losses.caption import next_token_targets

V, PAD, BOS, EOS = 12, 3, 1, 2  # a non-zero pad id on purpose


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, embed_dim=16, context_dim=24, width=32, heads=4, layers=4, context_length=10)
    return CocaTextDecoder(**{**args, **kw}).eval()


def test_pooler_matches_open_clip_and_ignores_padding():
    from open_clip.transformer import AttentionalPooler as OpenClipPooler

    torch.manual_seed(0)
    ours, ref = AttentionalPooler(32, 24, n_queries=5, n_heads=4), OpenClipPooler(32, 24, n_head=4, n_queries=5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24)
    out = ours(x)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out, ref(x))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    x2 = x.clone()
    x2[1, 4:] = 100.0  # padding content must not matter
    torch.testing.assert_close(ours(x, mask), ours(x2, mask))
    torch.testing.assert_close(ours(x, mask)[1], ours(x[1:2, :4])[0])


def test_decoder_shapes_and_causality():
    dec = _decoder()
    tokens, ctx = torch.randint(4, V, (2, 6)), torch.randn(2, 5, 24)
    with torch.no_grad():
        out = dec(tokens, ctx)
        assert out["text_embedding"].shape == (2, 16) and out["logits"].shape == (2, 6, V)
        for t in range(5):
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(4, V, changed[:, t + 1:].shape)
            changed[:, t + 1] = (tokens[:, t + 1] + 1 - 4) % (V - 4) + 4  # surely different
            other = dec(changed, ctx)
            torch.testing.assert_close(other["logits"][:, : t + 1], out["logits"][:, : t + 1])
            assert not torch.allclose(other["logits"][:, t + 1:], out["logits"][:, t + 1:])
            # the CLS embedding sees the whole text
            assert not torch.allclose(other["text_embedding"], out["text_embedding"])
        torch.testing.assert_close(dec.step(tokens[:, :4], ctx), out["logits"][:, 3], rtol=1e-5, atol=1e-5)
        # the context reaches the logits, not the (unimodal) text embedding
        other_ctx = dec(tokens, torch.randn(2, 5, 24))
        torch.testing.assert_close(other_ctx["text_embedding"], out["text_embedding"])
        assert not torch.allclose(other_ctx["logits"], out["logits"])


def test_decoder_padding_masks():
    dec = _decoder(pad_id=PAD)
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 7, 8, 9, 10, EOS]])
    ctx = torch.randn(2, 5, 24)
    ctx_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = dec(tokens, ctx, context_mask=ctx_mask)
        junk = tokens.clone()
        junk[0, 4:] = torch.tensor([9, 11])
        ctx2 = ctx.clone()
        ctx2[0, 3:] = 50.0
        # explicit mask: what sits in padded text or context slots changes nothing real
        same = dec(junk, ctx2, attention_mask=tokens != PAD, context_mask=ctx_mask)
        torch.testing.assert_close(same["text_embedding"], out["text_embedding"])
        torch.testing.assert_close(same["logits"][0, :4], out["logits"][0, :4])
        torch.testing.assert_close(same["logits"][1], out["logits"][1])
        # the padded row equals the same caption without padding, up to the CLS position
        short = dec(tokens[:1, :4], ctx[:1, :3])
        torch.testing.assert_close(short["logits"][0], out["logits"][0, :4], rtol=1e-5, atol=1e-5)


def test_head_shapes_and_config_errors():
    head = CocaHead(token_dim=20, embed_dim=16, context_dim=24, n_queries=7, n_heads=4)
    out = head(torch.randn(3, 11, 20), mask=torch.ones(3, 11, dtype=torch.bool))
    assert out["embedding"].shape == (3, 16) and out["context"].shape == (3, 7, 24)
    with pytest.raises(ValueError):
        _decoder(layers=4, unimodal_layers=4)
    with pytest.raises(ValueError, match="context_length"):
        _decoder()(torch.zeros(1, 11, dtype=torch.long), torch.randn(1, 2, 24))


@pytest.mark.slow
def test_tiny_coca_overfits_four_captions():
    torch.manual_seed(0)
    captions = torch.tensor([
        [BOS, 5, 6, 7, EOS],
        [BOS, 8, 5, EOS, PAD],
        [BOS, 7, 7, 9, EOS],
        [BOS, 4, EOS, PAD, PAD],
    ])
    tower_tokens = torch.randn(4, 6, 16)
    head = CocaHead(token_dim=16, embed_dim=16, context_dim=32, n_queries=4, n_heads=4)
    dec = CocaTextDecoder(V, embed_dim=16, context_dim=32, width=32, heads=4, layers=2, context_length=8,
                          pad_id=PAD)
    objective = build_loss("coca", ["image", "text"])
    params = list(head.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(300):
        h = head(tower_tokens)
        d = dec(captions, h["context"])
        logits, labels = next_token_targets(d["logits"], captions)
        embeddings = {"image": F.normalize(h["embedding"], dim=-1), "text": F.normalize(d["text_embedding"], dim=-1)}
        out = objective(AlignmentOutput(embeddings, caption=CaptionTargets(logits, labels, PAD)), torch.tensor(10.0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss_caption"].item() < 0.05
    head.eval(), dec.eval()
    with torch.no_grad():
        generated = generate(dec.step, head(tower_tokens)["context"], BOS, EOS, PAD, max_length=7)
        beam = generate(dec.step, head(tower_tokens)["context"], BOS, EOS, PAD, max_length=7, strategy="beam",
                        num_beams=3)
    assert generated.tolist() == captions.tolist()
    assert beam.tolist() == captions.tolist()


# open_clip's CoCa family with tiny towers (model kwargs override the named config), for the slower checks
TINY_OPEN_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=16, attentional_pool=True,
                    attn_pooler_heads=2, attn_pooler_queries=8, output_tokens=True),
    text_cfg=dict(context_length=76, vocab_size=49408, width=64, heads=2, layers=1, embed_cls=True,
                  output_tokens=True),
    multimodal_cfg=dict(context_length=76, vocab_size=49408, width=64, heads=2, layers=1, attn_pooler_heads=2),
)


@pytest.mark.slow
def test_open_clip_coca_builds_from_scratch():
    coca = open_clip_coca("coca_ViT-B-32").eval()
    assert (coca.pad_id, coca.bos_id, coca.eos_id) == (0, 49406, 49407)
    tokens = coca.tokenizer(["a dog"])[:, :5]
    with torch.no_grad():
        out = coca(torch.randn(1, 3, 224, 224), tokens)
    assert out["image_embedding"].shape == (1, 512) and out["text_embedding"].shape == (1, 512)
    assert out["logits"].shape == (1, 5, 49408)


def test_open_clip_coca_step_generate_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    coca = open_clip_coca("coca_ViT-B-32", **TINY_OPEN_CLIP).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = coca.tokenizer(["a dog", "two cats on a sofa"])[:, :8]
    with torch.no_grad():
        out = coca(images, tokens)
        assert out["logits"].shape == (2, 8, 49408)
        _, context = coca.encode_image(images)
        assert context.shape == (2, 7, 64)
        torch.testing.assert_close(coca.step(tokens[:, :3], context), out["logits"][:, 2], rtol=1e-4, atol=1e-4)
        ids = generate(coca.step, context, coca.bos_id, coca.eos_id, coca.pad_id, max_length=3)
    assert ids.shape[0] == 2 and ids.shape[1] <= 4 and all(isinstance(c, str) for c in coca.decode(ids))
    path = tmp_path / "coca.pt"
    torch.save(coca.model.state_dict(), path)
    again = open_clip_coca("coca_ViT-B-32", pretrained=str(path), **TINY_OPEN_CLIP).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images, tokens)["logits"], out["logits"])
    with pytest.raises(ValueError, match="not a CoCa"):
        open_clip_coca("RN50")
