"""The shipped demo model: loads, runs, and reproduces its model card."""
import json

from edgeloop.model.checkpoint import load_model, load_tokenizer
from edgeloop.model.data import corpus_split, encode
from edgeloop.model.evaluate import generate, perplexity


def test_demo_perplexity_matches_card(demo_dir):
    card = json.loads((demo_dir / "config.json").read_text())["extra"]["training"]
    model, tok = load_model(demo_dir), load_tokenizer(demo_dir)
    ids = encode(tok, corpus_split("validation"))[: card["val_tokens"]]
    ppl, n = perplexity(model, ids)
    assert n == card["val_tokens"] - 1
    assert abs(ppl - card["val_ppl"]) / card["val_ppl"] < 0.01, (ppl, card["val_ppl"])
    assert f"{card['val_ppl']:.3f}" in (demo_dir / "README.md").read_text()


def test_demo_writes_english(demo_dir):
    model, tok = load_model(demo_dir), load_tokenizer(demo_dir)
    ids = tok.encode("And the LORD said unto Moses", add_special_tokens=False).ids
    text = tok.decode(list(generate(model, ids, 24)))
    words = [w.strip(".,;:") for w in text.split()]
    common = {"the", "and", "of", "unto", "that", "shall", "he", "to", "thou", "in", "is", "i", "a", "my", "his"}
    assert sum(w.lower() in common for w in words) >= 4, text


def test_demo_loop_count_is_a_dial(demo_dir):
    """Trained with a randomized loop count: r/2 loops within 1.25x of r's perplexity, r+1 and r+2 not worse
    than r (1 % slack), and the card's per-loop figures reproduce."""
    cfg = json.loads((demo_dir / "config.json").read_text())
    card = cfg["extra"]["training"]
    by = {int(k): v for k, v in card["val_ppl_by_loops"].items()}
    r, top = cfg["num_loops"], cfg["max_loops"]
    assert card["train_config"]["loops"] != "fixed" and top >= r + 2 and set(by) == set(range(1, top + 1))
    assert by[r // 2] <= 1.25 * by[r] and max(by[r + 1], by[r + 2]) <= 1.01 * by[r]
    model, tok = load_model(demo_dir), load_tokenizer(demo_dir)
    ids = encode(tok, corpus_split("validation"))[: card["val_tokens"]]
    for loops in (1, r // 2, top):
        ppl, _ = perplexity(model, ids, num_loops=loops)
        assert abs(ppl - by[loops]) / by[loops] < 0.01, (loops, ppl, by[loops])
    row = " | ".join(f"{by[k]:.3f}" for k in sorted(by))
    assert row in (demo_dir / "README.md").read_text()
