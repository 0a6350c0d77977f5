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
