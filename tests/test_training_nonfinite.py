"""Non-finite losses skip the update (params and optimizer untouched), are counted, and abort after K in a row.

Uses the stage table the way a new stage would: a test stage whose loss is NaN on chosen steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_training_fixtures import read_metrics, tiny_train_config, train_tokenizer
from llada2_jax.training import model_source as ms
from llada2_jax.training import stages
from llada2_jax.training.run import Run, make_trainer
from llada2_jax.training.stages.pretrain import ARPretrain
from llada2_jax.training.trainer import NonFiniteLoss

NAN_STEPS = {"nan_once": (1,), "nan_always": tuple(range(100))}
NAN_STAGES = tuple(NAN_STEPS)


class NanStage(ARPretrain):
    """AR pretraining whose loss is NaN on the steps listed for its name."""

    def loss(self, segment, model, batch, rng, step):
        loss, metrics = super().loss(segment, model, batch, rng, step)
        poisoned = jnp.isin(step, jnp.asarray(NAN_STEPS[self.name]))
        return jnp.where(poisoned, jnp.nan, loss), metrics


@pytest.fixture(autouse=True)
def nan_stages(monkeypatch):
    for name in NAN_STAGES:
        monkeypatch.setitem(stages.STAGES, name, NanStage)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _config(tokenizer_dir, name):
    c = tiny_train_config(tokenizer_dir, stages=name)
    with c.unlocked():
        c[name] = c.ar_pretrain.copy_and_resolve_references()
    c[name].steps = 3
    c.train.update(dict(grad_accum=1, max_nonfinite_streak=3, checkpoint_every=100))
    return c


def _params(run):
    return ms.place_weights(ms.Source("workdir", run.workdir, run.model_config), run.layout, run.mesh, 0)[0]


def test_one_nan_step_is_skipped_and_counted(tmp_path, tokenizer_dir):
    run = Run(_config(tokenizer_dir, "nan_once"), str(tmp_path / "run"))
    run.execute()
    assert read_metrics(run.workdir, "nonfinite_skipped")[("nan_once", 3)] == 1
    losses = read_metrics(run.workdir)
    assert np.isfinite(losses[("nan_once", 1)]) and np.isfinite(losses[("nan_once", 3)])
    assert losses[("nan_once", 2)] == "nan"


def test_nan_streak_aborts_with_untouched_weights(tmp_path, tokenizer_dir):
    config = _config(tokenizer_dir, "nan_always")
    run = Run(config, str(tmp_path / "run"))
    with pytest.raises(NonFiniteLoss, match="max_nonfinite_streak=3"):
        run.execute()
    start = ms.place_weights(run.source, run.layout, run.mesh, config.seed)[0]
    trainer = make_trainer(run.stage("nan_always"))
    saved = trainer.checkpointer.restore_model(trainer.checkpointer.latest_step(), run.layout.abstract_params,
                                               run.layout.abstract_buffers)[0]
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
