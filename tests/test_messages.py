"""The chat format ``messages`` (mrloss/formats/messages.py) against Qwen's real tokenizer and a Qwen-style chat
template (conftest.py): exact content offsets, default weights and end of turn, overrides, LEARN tags inside,
TRL's and verl's column names, errors; through encode, the dataset and the visualizer."""

import pytest

from mrloss.data import MultiRegionCollator, MultiRegionDataset, encode
from mrloss.formats import FormatError, detect_format, parse, to_format

CHAT = {
    "messages": [
        {"role": "system", "content": "你是一位物理老师。"},
        {"role": "user", "content": "什么是梯度下降？ 🙂"},
        {"role": "assistant", "content": "梯度下降法通过迭代更新参数。"},
        {"role": "user", "content": "再说一遍"},
        {"role": "assistant", "content": 'It <LEARN weight="2" type="concept">follows −∇L</LEARN> 👍🏽.'},
    ]
}


def test_contents_are_located_exactly_and_assistants_learn_their_end_of_turn(qwen_tokenizer):
    region_text = parse(CHAT, tokenizer=qwen_tokenizer, sample_id="chat:1")
    plain = [{"role": m["role"], "content": m["content"]} for m in CHAT["messages"]]
    plain[4]["content"] = "It follows −∇L 👍🏽."
    assert region_text.text == qwen_tokenizer.apply_chat_template(plain, tokenize=False)
    assert region_text.has_special_tokens and region_text.default_weight == 0.0
    spans = [(region_text.text[r.start : r.end], r.weight, r.type) for r in region_text.regions]
    assert spans == [
        ("梯度下降法通过迭代更新参数。<|im_end|>", 1.0, "assistant"),
        ("It ", 1.0, "assistant"),
        ("follows −∇L", 2.0, "concept"),
        (" 👍🏽.<|im_end|>", 1.0, "assistant"),
    ]


def test_encode_learns_answers_and_end_of_turn_tokens_only(qwen_tokenizer):
    region_text = parse(CHAT, tokenizer=qwen_tokenizer)
    encoding = encode(region_text, qwen_tokenizer)
    ids, weights = encoding["input_ids"], encoding["token_weights"]
    # the template's own tokens: nothing added, no EOS appended after the final "\n"
    assert ids == qwen_tokenizer(region_text.text, add_special_tokens=False)["input_ids"]
    assert qwen_tokenizer.decode(ids[-2:]) == "<|im_end|>\n"
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_ends = [k for k, token in enumerate(ids) if token == im_end]
    assert [weights[k] for k in im_ends] == [0.0, 0.0, 1.0, 0.0, 1.0]  # system, user, assistant, user, assistant
    learned = qwen_tokenizer.decode([t for t, w in zip(ids, weights) if w > 0])
    assert learned == "梯度下降法通过迭代更新参数。<|im_end|>It follows −∇L 👍🏽.<|im_end|>"
    assert sorted(set(weights)) == [0.0, 1.0, 2.0]


def test_per_message_weight_and_type_override_the_defaults(qwen_tokenizer):
    sample = {
        "messages": [
            {"role": "user", "content": "问题", "weight": 0.5, "type": "question"},
            {"role": "assistant", "content": "答案", "weight": 0},
            {"role": "assistant", "content": "typed context", "type": "note", "weight": 0.0},
        ]
    }
    region_text = parse(sample, tokenizer=qwen_tokenizer)
    spans = [(region_text.text[r.start : r.end], r.weight, r.type) for r in region_text.regions]
    # a system prompt the template adds is context; a weight-0 assistant learns nothing (not even its end)
    assert spans == [("问题<|im_end|>", 0.5, "question"), ("typed context", 0.0, "note")]
    assert detect_format(sample) == "messages"


def test_end_of_turn_is_the_first_special_token_when_eos_is_not_there(qwen_tokenizer):
    original = qwen_tokenizer.eos_token
    try:
        qwen_tokenizer.eos_token = "<|endoftext|>"  # Qwen's base models: EOS is not the end-of-turn marker
        region_text = parse({"messages": [{"role": "assistant", "content": "答"}]}, tokenizer=qwen_tokenizer)
    finally:
        qwen_tokenizer.eos_token = original
    assert [region_text.text[r.start : r.end] for r in region_text.regions] == ["答<|im_end|>"]


def test_trl_prompt_completion_learns_the_completion(qwen_tokenizer):
    sample = {
        "prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "let me think"}],
        "completion": [{"role": "assistant", "content": "4"}],
        "tools": '[{"type": "function", "function": {"name": "add", "parameters": {}}}]',
        "chat_template_kwargs": {"enable_thinking": False},
        "id": "metadata is kept out",
    }
    assert detect_format(sample) == "messages"
    region_text = parse(sample, tokenizer=qwen_tokenizer)
    assert [region_text.text[r.start : r.end] for r in region_text.regions] == ["4<|im_end|>"]


def test_plain_text_samples_carry_prompt_or_tools_only_as_allowed_metadata():
    assert detect_format({"text": "a", "prompt": "x"}) == "tag_based"
    with pytest.raises(FormatError, match="unknown key 'tools'"):
        parse({"text": "a", "tools": []})
    assert parse({"text": "a", "tools": []}, extra_keys="keep").text == "a"
    assert parse({"text": "a", "prompt": "x"}, extra_keys=["prompt"]).text == "a"


def _error(sample, tokenizer, **options) -> FormatError:
    with pytest.raises(FormatError) as caught:
        parse(sample, tokenizer=tokenizer, sample_id="f.jsonl:3", **options)
    assert caught.value.sample_id == "f.jsonl:3"
    return caught.value


def test_errors_name_the_sample_field_and_position(qwen_tokenizer, tokenizer):
    def chat(*messages):
        return {"messages": list(messages)}

    user = {"role": "user", "content": "hi"}
    cases = [
        (chat({"role": "robot", "content": "x"}), qwen_tokenizer, "messages[0].role", "unknown role 'robot'"),
        (chat(user, {"role": "assistant", "content": 42}), qwen_tokenizer, "messages[1].content", "must be a string"),
        (chat({"role": "user", "content": [{"type": "text", "text": "x"}]}), qwen_tokenizer, "messages[0].content", ""),
        (chat({"role": "user"}), qwen_tokenizer, "messages[0].content", "missing"),
        (chat({"content": "x"}), qwen_tokenizer, "messages[0].role", "missing"),
        (chat(user, {"role": "assistant", "content": "x", "wieght": 2}), qwen_tokenizer, "messages[1].wieght", ""),
        (chat({"role": "assistant", "content": "x", "weight": -1}), qwen_tokenizer, "messages[0].weight", ">= 0"),
        (chat(), qwen_tokenizer, "messages", "must not be empty"),
        ({"messages": "hi"}, qwen_tokenizer, "messages", "must be a list"),
        ({"prompt": [user]}, qwen_tokenizer, "completion", "missing"),
        ({"prompt": "The sky is", "completion": " blue"}, qwen_tokenizer, "prompt", "list of messages"),
        ({"messages": [user], "text": "x"}, qwen_tokenizer, "text", "does not belong"),
        ({"messages": [user], "tools": "{bad"}, qwen_tokenizer, "tools", "invalid JSON"),
        (chat(user), tokenizer, "messages", "no chat template"),
        (chat(user), None, "messages", "needs the tokenizer"),
    ]
    for sample, chosen, field, reason in cases:
        error = _error(sample, chosen)
        assert error.field == field and reason in error.reason, (sample, error)
    tag = _error(chat({"role": "assistant", "content": "ab <LEARN>c"}), qwen_tokenizer)
    assert (tag.field, tag.position) == ("messages[0].content", 3) and "unclosed" in tag.reason


def test_a_template_that_changes_content_is_an_error(qwen_tokenizer):
    stripping = qwen_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    original = qwen_tokenizer.chat_template
    try:
        qwen_tokenizer.chat_template = stripping
        assert parse({"messages": [{"role": "user", "content": "x"}]}, tokenizer=qwen_tokenizer).text  # no change
        error = _error(
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " y"}]}, qwen_tokenizer
        )
        assert error.field == "messages[1].content" and "changes this content" in error.reason
        qwen_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
        error = _error({"messages": [{"role": "user", "content": "x"}]}, qwen_tokenizer)
        assert "roles must alternate" in error.reason and error.field == "messages"
    finally:
        qwen_tokenizer.chat_template = original


def test_rendered_chat_cannot_be_written_as_a_plain_text_format(qwen_tokenizer):
    with pytest.raises(FormatError, match="rendered chat template"):
        to_format(parse(CHAT, tokenizer=qwen_tokenizer), "tag_based")


def test_dataset_and_collator_with_chat_and_plain_samples(qwen_tokenizer):
    plain = {"text": 'Intro. <LEARN weight="2">梯度</LEARN>'}
    dataset = MultiRegionDataset.from_samples([CHAT, plain], qwen_tokenizer)
    assert dataset.region_types == ["assistant", "concept", "default"]
    chat_item, plain_item = dataset[0], dataset[1]
    assert chat_item["input_ids"].tolist() == encode(parse(CHAT, tokenizer=qwen_tokenizer), qwen_tokenizer)["input_ids"]
    assert plain_item["input_ids"][-1] == qwen_tokenizer.eos_token_id  # plain text still gets its EOS
    batch = MultiRegionCollator(qwen_tokenizer.pad_token_id)([chat_item, plain_item])
    assert batch["token_weights"].max() == 2.0 and batch["labels"].shape == batch["input_ids"].shape


def test_verl_chat_keys_are_mapped():
    from mrloss.integrations.verl.dataset import chat_sample

    config = {
        "messages_key": "conversation",
        "tools_key": "functions",
        "enable_thinking_default": "none",
        "apply_chat_template_kwargs": {"custom": 1},
    }
    sample = {"conversation": [{"role": "user", "content": "x"}], "functions": [], "enable_thinking": False}
    assert chat_sample(sample, config) == {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [],
        "chat_template_kwargs": {"custom": 1, "enable_thinking": False},
    }
    assert chat_sample({"text": "x"}, config) == {"text": "x"}
    assert chat_sample({"messages": []}, {}) == {"messages": []}


def test_verl_dataset_reads_chat_under_its_messages_key(qwen_tokenizer, tmp_path):
    import json

    from mrloss.integrations.verl.dataset import MultiRegionSFTDataset

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversation": CHAT["messages"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    dataset = MultiRegionSFTDataset(str(path), qwen_tokenizer, {"messages_key": "conversation"})
    item = dataset[0]
    expected = encode(parse(CHAT, tokenizer=qwen_tokenizer), qwen_tokenizer)
    assert item["input_ids"].tolist() == expected["input_ids"]
    assert item["loss_mask"].tolist() == expected["token_weights"]
    assert dataset.region_types == ["assistant", "concept"]


def test_prepare_reads_chat_samples_with_the_tokenizers_template(qwen_tokenizer, tmp_path):
    import json

    from mrloss.data.prepare import main

    tokenizer_dir = tmp_path / "qwen"
    qwen_tokenizer.save_pretrained(tokenizer_dir)
    raw = tmp_path / "chat.jsonl"
    raw.write_text("".join(json.dumps(CHAT, ensure_ascii=False) + "\n" for _ in range(3)), encoding="utf-8")
    out = tmp_path / "out"
    assert main([str(raw), "--output-dir", str(out), "--tokenizer", str(tokenizer_dir), "--num-proc", "1"]) == 0
    assert len((out / "train.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    dataset = MultiRegionDataset.from_disk([out / "train.tokenized"], qwen_tokenizer)
    weights = dataset[0]["token_weights"]
    assert weights.max().item() == 2.0 and (weights == 0).sum().item() > 0


def test_mrloss_train_on_chat_data_with_a_local_chat_model(qwen_tokenizer, tmp_path, capsys):
    """``data.format: messages`` with ``model.path`` a local chat model: trains, assistant turns learned (region
    type = role). Without model.path (a BPE trained on the data has no chat template): one line naming it."""
    import json

    import yaml
    from tiny_models import tiny_causal_lm

    from mrloss.cli import main

    model_dir = tmp_path / "model"
    tiny_causal_lm(len(qwen_tokenizer), num_hidden_layers=1).save_pretrained(model_dir)
    qwen_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(CHAT, ensure_ascii=False) + "\n" for _ in range(4)), encoding="utf-8")

    def train(model: dict, run: str) -> tuple[int, str]:
        config = {
            "data": {"train_files": [str(data)], "format": "messages", "max_length": 96},
            "model": model,
            "trainer": {"output_dir": str(tmp_path / run), "device": "cpu", "max_steps": 2, "logging_steps": 1},
        }
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        code = main(["train", "--config", str(tmp_path / f"{run}.yaml")])
        return code, capsys.readouterr().err

    code, err = train({"path": str(model_dir)}, "run")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text(encoding="utf-8"))
    assert (
        set(metrics["region_types"]) == {"assistant", "concept"} and metrics["region_losses"]["last"]["assistant"] > 0
    )
    code, err = train({"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1}, "bpe")
    assert code == 2 and "the messages format needs the tokenizer" in err and "model.path" in err, err
    assert err.count("\n") == 1
