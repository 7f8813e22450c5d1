"""Golden BERT fixtures for petal (sequence classification), made by the real transformers + PEFT
(versions in requirements.txt).

Writes tests/fixtures/golden/:
  bert/                    tiny random BertForSequenceClassification (3 labels) as an HF folder
                           (config.json, model.safetensors, WordPiece tokenizer.json, tokenizer_config.json);
                           LayerNorm weights/biases and all biases moved off their init so they differ
  bert_minilm_names/       the same encoder saved as a plain BertModel (names as all-MiniLM-L6-v2 ships
                           them: embeddings.*, encoder.layer.N.*, pooler.dense.*; no classifier)
  bert_lora/, bert_ia3/, bert_loha/
                           PEFT adapters with task_type="SEQ_CLS" (the classifier is a modules_to_save
                           copy, perturbed so it matters)
  bert_seqcls.safetensors  input_ids / attention_mask / token_type_ids (3, 10) for a single sentence,
                           a sentence pair and a right-padded short sentence; base.hidden (3, 10, 32),
                           base.pooled (3, 32), base.logits (3, 3), <adapter>.logits (3, 3)
  bert_seqcls.json         the texts, their ids, the adapters' settings and the library versions

    python -m venv .venv && .venv/bin/pip install -r tools/golden/requirements.txt
    .venv/bin/python tools/golden/make_bert_fixtures.py

All outputs are taken in eval() mode (dropout off). Each adapter is made on a fresh copy of bert/
and then checked: PeftModel.from_pretrained on another fresh copy must give the same logits.
"""
import json
import os

import peft
import safetensors
import tokenizers
import torch
import transformers
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
BERT = os.path.join(ROOT, "bert")
MINILM = os.path.join(ROOT, "bert_minilm_names")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "an", "and", "or", "of", "to", "in", "on", "over", "under", "with", "is", "was",
    "it", "this", "that", "cat", "dog", "fox", "bird", "fish", "sat", "ran", "jump", "quick",
    "slow", "brown", "red", "blue", "green", "big", "small", "hello", "world", "good", "bad",
    "movie", "film", "book", "love", "hate", "like", "very", "not", "play", "walk", "talk",
    "house", "tree", "sun", "moon", "day", "night", "happy", "sad", ".", ",", "!", "?",
]
PIECES = ["##s", "##ed", "##ing", "##ly", "##er"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS + PIECES)}
V = len(VOCAB)

# (text, text_pair): the longest row is exactly SEQ tokens, the last one is padded
TEXTS = [
    ("The quick brown fox jumps over zebras", None),  # "jump ##s", an unknown word
    ("The cat sat.", "A dog ran"),                    # pair: token_type_ids 1 on "a dog ran [SEP]"
    ("Hello, world", None),                           # short: right-padded with [PAD]=0
]
SEQ = 10

ADAPTERS = {
    "bert_lora": dict(method="lora", task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                      init_lora_weights=False),
    # "output.dense" also matches attention.output.dense (PEFT matches on a ".name" suffix, and
    # feedforward_modules on a plain suffix), so both are feedforward (input-scaled) here
    "bert_ia3": dict(method="ia3", task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                     feedforward_modules=["output.dense"]),
    "bert_loha": dict(method="loha", task_type="SEQ_CLS", r=2, alpha=4, target_modules=["query", "value"],
                      init_weights=False),
}


def make_tokenizer():
    tok = Tokenizer(models.WordPiece(vocab=VOCAB, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL)  # all already in the vocab: ids unchanged, never split
    return tok


def write_tokenizer(tok, d):
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]", "do_lower_case": True}, f, indent=2)


def encode(tok):
    encs = [tok.encode(a) if b is None else tok.encode(a, b) for a, b in TEXTS]
    assert max(len(e.ids) for e in encs) == SEQ, [len(e.ids) for e in encs]
    ids = torch.zeros(len(encs), SEQ, dtype=torch.int64)  # [PAD] = 0, right padding
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = torch.tensor(e.attention_mask)
        types[i, :n] = torch.tensor(e.type_ids)
    return encs, ids, mask, types


def bert_config():
    # initializer_range 0.2 (not BERT's 0.02): with 0.02 the attention/FFN branches are so small next to
    # the residual that ignoring the padding mask moves the logits by ~1e-5; at 0.2 by ~0.1
    return BertConfig(initializer_range=0.2, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                      num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)


def base_model():
    torch.manual_seed(0)
    m = BertForSequenceClassification(bert_config()).eval()
    with torch.no_grad():  # LayerNorm (1, 0) and biases (0) off their init
        for n, p in m.named_parameters():
            if n.endswith(".bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def load_base():
    m = BertForSequenceClassification.from_pretrained(BERT).eval()
    m.name_or_path = None  # adapter_config.json: base_model_name_or_path null, not this machine's path
    return m


def peft_config(kw):
    kw = dict(kw)
    method = kw.pop("method")
    return {"lora": LoraConfig, "ia3": IA3Config, "loha": LoHaConfig}[method](**kw)


def perturb(model, method):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method == "ia3" and "ia3_l" in n:  # IA3 vectors start at 1 (identity)
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif ".modules_to_save." in n:  # the classifier copy starts equal to the base classifier
                p.add_(0.1 * torch.randn_like(p))


def logits(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.float().contiguous()


def main():
    os.makedirs(BERT, exist_ok=True)
    os.makedirs(MINILM, exist_ok=True)
    tok = make_tokenizer()
    write_tokenizer(tok, BERT)
    write_tokenizer(tok, MINILM)
    encs, ids, mask, types = encode(tok)

    m = base_model()
    m.save_pretrained(BERT, safe_serialization=True)
    enc = BertModel(bert_config()).eval()
    enc.load_state_dict(m.bert.state_dict())
    enc.save_pretrained(MINILM, safe_serialization=True)

    m = load_base()
    with torch.no_grad():
        out = m.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ref = m(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
               "base.hidden": out.last_hidden_state.float().contiguous(),
               "base.pooled": out.pooler_output.float().contiguous(), "base.logits": ref.float().contiguous()}
    print("attn implementation:", m.config._attn_implementation, "| hidden_act:", m.config.hidden_act,
          "->", type(m.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__)
    # checks: the pooler feeds the classifier; eager == sdpa; the MiniLM-named copy == the encoder
    pooled_logits = torch.nn.functional.linear(out.pooler_output, m.classifier.weight, m.classifier.bias)
    print("logits == classifier(pooler_output): max |diff|", (pooled_logits - ref).abs().max().item())
    eager = BertForSequenceClassification.from_pretrained(BERT, attn_implementation="eager").eval()
    print("eager vs", m.config._attn_implementation, "logits: max |diff|", (logits(eager, ids, mask, types) - ref).abs().max().item())
    mini = BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        h = mini(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    print("bert_minilm_names hidden vs base: max |diff|", (h - out.last_hidden_state).abs().max().item())
    hf_tok = AutoTokenizer.from_pretrained(BERT)
    hf_ids = [hf_tok(a, b)["input_ids"] if b else hf_tok(a)["input_ids"] for a, b in TEXTS]
    print("AutoTokenizer:", type(hf_tok).__name__, "| same ids as tokenizers:", hf_ids == [e.ids for e in encs])

    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(1 + i)
        pm = get_peft_model(load_base(), peft_config(kw)).eval()
        perturb(pm, kw["method"])
        out_dir = os.path.join(ROOT, name)
        pm.save_pretrained(out_dir, safe_serialization=True)
        tensors[f"{name}.logits"] = logits(pm, ids, mask, types)
        with torch.no_grad():  # the adapter alone (the classifier copy aside) must move the encoder
            dh = (pm.base_model.model.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
                  - out.pooler_output).abs().max().item()
        back = PeftModel.from_pretrained(load_base(), out_dir).eval()
        d = (logits(back, ids, mask, types) - tensors[f"{name}.logits"]).abs().max().item()
        dbase = (tensors[f"{name}.logits"] - ref).abs().max().item()
        print(f"{name}: reload max |diff| {d:.3g} (vs base: logits {dbase:.3g}, pooled {dh:.3g})")
        assert d < 1e-5 and dbase > 1e-2 and dh > 1e-3
        saved = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
        assert any("classifier" in k for k in saved), sorted(saved)

    save_file(tensors, os.path.join(ROOT, "bert_seqcls.safetensors"))
    meta = {
        "texts": [{"text": a, "text_pair": b, "tokens": e.tokens, "ids": e.ids} for (a, b), e in zip(TEXTS, encs)],
        "seq_len": SEQ, "padding": "right, [PAD]=0, to the longest", "vocab_size": V,
        "attn_implementation": m.config._attn_implementation,
        "adapters": {n: {k: v for k, v in kw.items()} for n, kw in ADAPTERS.items()},
        "adapter_perturbation": "classifier modules_to_save copy += 0.1*randn; IA3 vectors = 1 + 0.1*randn",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__},
    }
    with open(os.path.join(ROOT, "bert_seqcls.json"), "w") as f:
        json.dump(meta, f, indent=2)

    total = 0
    for d in ["bert", "bert_minilm_names", *ADAPTERS]:
        for fn in sorted(os.listdir(os.path.join(ROOT, d))):
            s = os.path.getsize(os.path.join(ROOT, d, fn))
            total += s
            print(f"  {d}/{fn}: {s}")
    for fn in ["bert_seqcls.safetensors", "bert_seqcls.json"]:
        s = os.path.getsize(os.path.join(ROOT, fn))
        total += s
        print(f"  {fn}: {s}")
    print("total bytes:", total)


if __name__ == "__main__":
    main()
