import torch


def test_held_memo_recomputes_for_new_inputs_even_in_the_old_inputs_memory():
    from nnshrink.search.engine import held_memo

    store, calls = {}, []
    model = torch.nn.Linear(2, 2)

    def compute(x):
        calls.append(1)
        return float(x.sum())

    x = torch.ones(64)
    assert held_memo(store, "fc", (model, x), lambda: compute(x)) == 64.0
    assert held_memo(store, "fc", (model, x), lambda: compute(x)) == 64.0 and len(calls) == 1
    y = torch.zeros(64)  # another tensor: recomputed, whatever memory it sits in
    assert held_memo(store, "fc", (model, y), lambda: compute(y)) == 0.0 and len(calls) == 2
    assert list(store) == ["fc"] and store["fc"][0][1] is y  # one entry, holding its owners
