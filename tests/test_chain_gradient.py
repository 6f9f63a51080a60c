"""The whole chain text -> Embedding -> Morpher -> StructuralLoss against
finite differences (float64, 1e-4 relative), both sides through one embedding."""
import numpy as np
import pytest

from grapheme import Embedding, Graph, Morpher, StructuralLoss, gradcheck, ops

INPUTS = ["abcab", "xyz", "1223", ""]
TARGETS = ["ab", "xy", "12", "q"]


def pipeline(estimator, theta):
    emb = Embedding(dim=4, seed=11)
    g = Graph.from_texts(INPUTS)
    t = Graph.from_texts(TARGETS)
    emb.forward(np.concatenate([g.labels, t.labels]))  # every row exists
    morpher = Morpher(threshold=theta, temperature=0.3, estimator=estimator)
    loss = StructuralLoss()

    def run(weight, theta_value):
        emb.weight = weight
        emb.zero_grad()
        morpher.theta[...] = theta_value
        morpher.zero_grad()
        H = emb.forward(g.labels)
        morphed = morpher.forward(g, H)
        target = t.replace(activation=emb.forward(t.labels).mean(axis=1))
        res = loss.forward(morphed.graph, target)
        lg = loss.backward(res)
        # the activation is the feature mean: its gradient maps to features
        gf = ops.FeatureMean().vjp(morphed.graph.features.shape, lg.activation)[0]
        # the relaxed graph's masses and expected edge weights depend on H and
        # theta too (the hard graph's are constants)
        dH = morpher.backward(morphed, grad_features=gf, grad_mass=lg.mass,
                              grad_weights=lg.weights)
        emb.backward(g.labels, dH)
        emb.backward(t.labels, ops.FeatureMean().vjp((t.num_nodes, emb.dim),
                                                     lg.target_activation)[0])
        return res.value, emb.grad.copy(), float(morpher.grad_theta), morphed

    return emb, morpher, run


@pytest.mark.parametrize("estimator, theta", [("history", -0.3), ("soft", -0.3)])
def test_full_chain_gradient(estimator, theta):
    emb, morpher, run = pipeline(estimator, theta)
    W0 = emb.weight.copy()
    _, _, _, morphed = run(W0, theta)
    margin = np.abs(morphed.similarity - morpher.tau).min()
    assert margin > 1e-3  # away from merge decision boundaries
    assert 0 < morphed.history.num_outputs < morphed.history.num_inputs  # some merges
    res = gradcheck(lambda W: run(W, theta)[:2], W0, eps=1e-6, rtol=1e-4)
    assert res.ok, res.error
    if estimator == "soft":  # the threshold too
        res = gradcheck(lambda th: (run(W0, float(th))[0], np.array(run(W0, float(th))[2])),
                        np.array(theta), eps=1e-6, rtol=1e-4)
        assert res.ok, res.error
