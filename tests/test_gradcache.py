"""GradCache gives the parameter gradients (and the AdamW step) of plain training on the same batch."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmalign.gradcache import gradcache_step, split_batch
from mmalign.losses import AlignmentOutput, clip_loss


class Towers(nn.Module):
    """Two tiny MLP towers with dropout and a learnable log logit scale."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 8))
        self.text = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 8))
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def encode(self, name):
        return lambda x: F.normalize(getattr(self, name)(x), dim=-1)

    def forward(self, batch):
        """The model's forward: every modality of the batch, in order."""
        return AlignmentOutput({m: self.encode(m)(x) for m, x in batch.items()})

    def loss(self, emb):
        return {"loss": clip_loss(emb["image"], emb["text"], self.log_scale.exp()), "scale": self.log_scale.exp()}


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Towers().double().train()
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(22, 12, generator=g, dtype=torch.float64),
             "text": torch.randn(22, 10, generator=g, dtype=torch.float64)}
    return model, batch


def _plain_step(model, batch, chunk):
    """Reference: the full graph, the forward run chunk by chunk in the same order (the same dropout draws)."""
    parts = [model(c).embeddings for c in split_batch(batch, chunk)]
    loss = model.loss({m: torch.cat([p[m] for p in parts]) for m in batch})["loss"]
    loss.backward()
    return loss.detach()


def _gradcache_step(model, batch, chunk):
    return gradcache_step(model, batch, lambda out: model.loss(out.embeddings), chunk_size=chunk)


@pytest.mark.parametrize("chunk", [5, 22])
def test_gradients_and_adamw_step_equal_plain_training(chunk):
    model, batch = _setup()
    ref_model = copy.deepcopy(model)
    torch.manual_seed(123)
    out = _gradcache_step(model, batch, chunk)
    rng_after = torch.get_rng_state()
    torch.manual_seed(123)
    ref_loss = _plain_step(ref_model, batch, chunk)
    assert torch.equal(rng_after, torch.get_rng_state())  # the replay leaves the generator where plain training does
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert set(out.outputs) == {"loss", "scale"} and out.embeddings["image"].shape == (22, 8)
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    for m in (model, ref_model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        opt.step()
    for p, p_ref in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-10, atol=1e-12)


def test_dropout_matters_so_the_rng_replay_is_tested():
    """Without the same dropout masks the gradients differ: the equality above is not vacuous."""
    model, batch = _setup()
    ref_model = copy.deepcopy(model)
    torch.manual_seed(123)
    _gradcache_step(model, batch, 5)
    torch.manual_seed(124)
    _plain_step(ref_model, batch, 5)
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref_model.parameters()))
    assert diff > 1e-4


def test_nested_batches_are_split_by_rows_and_the_loss_sees_the_whole_output():
    """A modality's inputs may be a dict (e.g. token ids and masks): each tensor in it is split by rows; the loss gets
    the whole batch's output (presence masks included), concatenated from the chunks."""
    model, batch = _setup()
    ref_model = copy.deepcopy(model)
    present = torch.arange(22) % 3 > 0
    nested = {"image": batch["image"], "text": {"x": batch["text"], "w": torch.ones(22, dtype=torch.float64)},
              "text__present": present}

    def forward(chunk):
        return AlignmentOutput({"image": model.encode("image")(chunk["image"]),
                                "text": model.encode("text")(chunk["text"]["x"] * chunk["text"]["w"][:, None])},
                               present={"text": chunk["text__present"]})

    def loss(out):
        assert torch.equal(out.present["text"], present) and out.embeddings["text"].shape == (22, 8)
        return model.loss(out.embeddings)

    torch.manual_seed(5)
    gradcache_step(forward, nested, loss, chunk_size=6)
    torch.manual_seed(5)
    _plain_step(ref_model, batch, 6)
    for p, p_ref in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)
