"""What the estimators learn: the threshold, the merges, the compression rate.

These are the experiments of DESIGN.md ("Descent") turned into tests, with
the numbers measured when they were written in the comments.
"""
import numpy as np
import pytest

from grapheme import (DEMO_PAIRS, Adam, Embedding, Graph, Morpher, RateController, Reinforce,
                      StructuralLoss, Trainer, ops, replicate)
from grapheme.data import make_pairs

# the mix these tests were calibrated on (arithmetic left the default mix later)
OLD_MIX = ("arithmetic", "dedup", "fold")


def fit_demo(estimator, epochs, lr):
    morpher = Morpher(estimator=estimator)
    trainer = Trainer(Embedding(dim=64, seed=0), morpher, StructuralLoss(), Adam(lr=lr),
                      batch_size=3, seed=0, progress=False)
    tau0 = morpher.tau
    trainer.fit(DEMO_PAIRS, epochs, val=DEMO_PAIRS)
    first = trainer.baseline["val_loss"]   # the untrained model's, table grown
    return trainer, morpher, tau0, first


def initial_theta_gradient(estimator):
    """d loss / d theta at the initial parameters, through the public API
    (for reinforce: averaged over 64 replicas of the batch)."""
    if estimator == "reinforce":
        estimator = Reinforce(baseline=None, samples=64)
    morpher = Morpher(estimator=estimator)
    emb, loss = Embedding(dim=64, seed=0), StructuralLoss()
    g = Graph.from_texts([a for a, _ in DEMO_PAIRS])
    target = Graph.from_texts([b for _, b in DEMO_PAIRS])
    target = target.replace(activation=emb.forward(target.labels).mean(axis=1))
    morphed = morpher.forward(g, emb.forward(g.labels))
    res = loss.forward(morphed.graph, replicate(target, morphed.samples))
    lg = loss.backward(res)
    advantage = morphed.advantage(res.values)
    grad = morpher.vjp(
        morphed, grad_features=ops.FeatureMean().vjp(morphed.graph.features.shape,
                                                     lg.activation)[0],
        grad_mass=lg.mass, grad_weights=lg.weights,
        grad_log_prob=None if advantage is None else advantage / len(res.values))
    return float(grad.theta)


@pytest.mark.parametrize("estimator, epochs, lr", [
    ("ste", 100, 1e-2),        # measured: 1.628 -> 0.125, tau 0.690 -> 0.376
    ("soft", 100, 1e-2),       # measured: 1.628 -> 0.125, tau 0.690 -> 0.379
    ("reinforce", 200, 3e-2),  # measured: 1.628 -> 0.065, tau 0.690 -> 0.290
])
def test_threshold_learning_on_demo_pairs(estimator, epochs, lr):
    trainer, morpher, tau0, first = fit_demo(estimator, epochs, lr)
    final = trainer.evaluate(DEMO_PAIRS)["loss"]
    assert final < 0.5 * first, (first, final)
    # The threshold moved the way that lowers the loss: at the start the
    # estimator's d loss / d theta is positive (descent lowers theta) and
    # theta did go down.
    assert morpher.tau < tau0
    assert initial_theta_gradient(estimator) > 0
    # abc morphs to two nodes, like its target ab
    g = Graph.from_text("abc")
    assert morpher.predict(g, trainer.embedding.forward(g.labels)).graph.num_nodes == 2


def test_history_estimator_cannot_move_the_threshold():
    trainer, morpher, tau0, first = fit_demo("history", 20, 3e-3)
    assert morpher.tau == tau0
    assert trainer.evaluate(DEMO_PAIRS)["loss"] < first


# measured compression - target (w=10, step 0.5, proportional 5, 60 epochs,
# seed 0), targets 0.45 / 0.55 / 0.65:
#   history -0.006 -0.001 0.002 | soft -0.011 -0.007 0.044
#   ste -0.008 -0.021 0.026 | reinforce -0.013 0.001 0.036
# With the integral controller alone (proportional 0) reinforce ended up to
# 0.14 off on other seeds (a slow oscillation of the multiplier); with the
# PI controller it stays within 0.05 over seeds 0-19. The predict snapshot
# of soft and ste is the fragile part, see the next test.
#
# Measured without the unknown row's replacements (unknown_prob=0, the
# Trainer's default when these were written): the rate-control tests are
# about the controller. With the default 0.01, reinforce at 0.65 (seed 0)
# ends at 0.556 (its last 5 epochs' mean: 0.566); at 0.002, 0.005 and 0.02
# at 0.641, 0.629 and 0.643 (means 0.670, 0.641, 0.672), at 0 at 0.643: not
# monotone in the rate of replacements, a chaotic run any perturbation
# moves rather than their bias.
@pytest.mark.slow
@pytest.mark.parametrize("target", [0.45, 0.55, 0.65])
@pytest.mark.parametrize("estimator", ["history", "soft", "ste", "reinforce"])
def test_rate_control_reaches_the_target(estimator, target):
    pairs = make_pairs(200, seed=0, tasks=OLD_MIX)
    morpher = Morpher(estimator=estimator, rate=target)
    trainer = Trainer(Embedding(dim=32, seed=0), morpher, StructuralLoss(), Adam(lr=3e-2),
                      batch_size=16, seed=0, progress=False, unknown_prob=0.0)
    trainer.fit(pairs, 60)
    compression = trainer.evaluate(pairs)["kept_fraction"]
    assert abs(compression - target) <= 0.05, compression


# Other seeds. What the controller holds is the compression it measures, the
# hard k / n of the training morphs; its mean over the last 5 epochs ends
# within 0.03 of the target for history, soft and ste over seeds 0-9. The
# final snapshot of Morpher.predict (the test above) swings by up to +-0.1
# from one epoch to the next for soft and ste, even at lr 3e-3: their
# gradients gather similarities at the threshold, where a tiny step flips
# many merges.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("target", [0.45, 0.55, 0.65])
@pytest.mark.parametrize("estimator", ["history", "soft", "ste"])
def test_rate_control_holds_the_measured_compression(estimator, target, seed):
    assert abs(_held_compression(estimator, target, seed) - target) <= 0.05


# REINFORCE's runs scatter more: over seeds 0-19 a run's held compression
# ended up to 0.07 from 0.55 and 0.14 from 0.65 (seed 14), and rounding-level
# changes to the loss move single runs by a few hundredths either way. Its
# mean over seeds 0-9 stays within 0.02 of every target (measured before and
# after the loss's sums changed order): the controller holds the rate on
# average, a single run within 0.1.
@pytest.mark.slow
@pytest.mark.parametrize("target", [0.45, 0.55, 0.65])
def test_rate_control_holds_reinforce_on_average(target):
    errors = np.array([_held_compression("reinforce", target, seed) - target
                       for seed in range(10)])
    assert abs(errors.mean()) <= 0.03, errors
    assert np.abs(errors).max() <= 0.1, errors


def _held_compression(estimator, target, seed):
    """The mean ``kept_fraction`` of the last 5 of 60 epochs of rate-controlled
    training on 200 pairs of the old mix."""
    pairs = make_pairs(200, seed=seed, tasks=OLD_MIX)
    if estimator == "reinforce":
        estimator = Reinforce(seed=seed)
    morpher = Morpher(estimator=estimator, rate=target)
    trainer = Trainer(Embedding(dim=32, seed=seed), morpher, StructuralLoss(), Adam(lr=3e-2),
                      batch_size=16, seed=seed, progress=False, unknown_prob=0.0)   # as above
    records = trainer.fit(pairs, 60)
    return np.mean([r["kept_fraction"] for r in records[-5:]])


def test_rate_multiplier_moves_toward_the_target():
    g = Graph.from_text("abcdef")
    m = Morpher(threshold=5.0, rate=0.5)  # tau ~ 1: nothing merges
    out = m.forward(g, Embedding(dim=4).forward(g.labels))
    assert m.step(out) == pytest.approx(0.5 * (1.0 - 0.5))  # pushes to merge
    assert Morpher(rate=RateController(0.5, control="penalty")).step(out) == 0.0
    with pytest.raises(ValueError, match="control must be"):
        RateController(0.5, control="pid")


def test_rate_controller_is_proportional_plus_integral():
    # lambda += integral * e + proportional * (e - e_previous), exactly; the
    # last error travels with the state, so a resumed controller takes the
    # same step
    emb = Embedding(dim=4)
    none, all_ = Graph.from_text("abcdef"), Graph.from_text("aaaaaa")

    def controller():
        return Morpher(threshold=5.0, rate=RateController(0.5, integral=0.25, proportional=2.0))

    m = controller()
    e1 = 1.0 - 0.5                                   # nothing merges: k / n = 1
    assert m.step(m.forward(none, emb.forward(none.labels))) == 0.25 * e1
    state = m.state_dict()
    same = m.forward(all_, emb.forward(all_.labels))
    e2 = same.history.num_outputs / 6 - 0.5
    expected = 0.25 * e1 + 0.25 * e2 + 2.0 * (e2 - e1)
    assert m.step(same) == pytest.approx(expected, rel=1e-15)
    resumed = controller()
    resumed.load_state_dict(state)
    assert resumed.step(same) == pytest.approx(expected, rel=1e-15)
    fresh = dict(state, rate={"multiplier": state["rate"]["multiplier"], "error": None})
    resumed.load_state_dict(fresh)   # no previous error: the integral step alone
    assert resumed.step(same) == pytest.approx(0.25 * e1 + 0.25 * e2, rel=1e-15)
    with pytest.raises(ValueError, match="proportional must be >= 0"):
        RateController(0.5, proportional=-1.0)
    with pytest.raises(TypeError, match="proportional must be a real number"):
        RateController(0.5, proportional="5")
