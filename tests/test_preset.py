"""`preset: kvcomm_public`: the public KVComm code's receiver and metrics in one line, written into the
resolved config; and the public metrics themselves, against hand-computed values."""

import json
import random

import yaml

from cross_model.config import dump_yaml
from cross_model.context import load_experiment
from cross_model.evaluation import load_splits
from cross_model.metrics import edit_similarity, rouge_l_recall, rouge_l_recall_public


def test_public_rouge_l_is_summary_level_case_sensitive_recall():
    # Two reference sentences, each found whole in the response in another order: the union LCS per
    # reference sentence counts both (4 of 4 distinct words); one LCS over the flat texts finds 2 of 4.
    assert rouge_l_recall_public("Zed Wye Ex Why", ["Ex Why. Zed Wye."]) == 1.0
    assert rouge_l_recall("Zed Wye Ex Why", ["Ex Why. Zed Wye."]) == 0.5
    assert (
        rouge_l_recall_public("paris", ["Paris"]) == 0.0
        and rouge_l_recall("paris", ["Paris"]) == 1.0
    )
    assert (
        rouge_l_recall_public("", ["Paris"]) == 0.0
        and rouge_l_recall_public("  ", ["Paris"]) == 0.0
    )
    # One of three reference words: 1/3; the best of several answers.
    assert abs(rouge_l_recall_public("Lyon", ["Lyon is big", "Nice"]) - 1 / 3) < 1e-9
    assert rouge_l_recall_public("Lyon", ["Lyon is big", "Lyon"]) == 1.0


def _lcs(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


def test_edit_similarity_is_fuzz_ratio_the_rounded_lcs_ratio_of_the_first_code_line():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("ab(x) =1") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab(x) =1") for _ in range(rng.randint(1, 12)))
        want = round(100 * 2 * _lcs(a.strip("\n"), b) / (len(a.strip("\n")) + len(b))) / 100
        got = edit_similarity(a, [b])
        if a.strip() and not a.strip().startswith(("#", "```", '"""', "'''")):
            assert got == want, (a, b)
    assert edit_similarity("# comment\nx = 1\n", ["x = 1"]) == 1.0


def test_the_preset_writes_the_public_receiver_and_metrics_into_the_resolved_config():
    cfg = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: countries}, {name: samsum}, {name: repobench}]",
            "--methods",
            json.dumps(
                {
                    "baseline": {},
                    "kvcomm": {"selection": "all"},
                    "q": {"method": "qkvcomm", "selection": "all", "bits": 4},
                    "causal": {"method": "kvcomm", "selection": "all", "receiver_mask": "causal"},
                }
            ),
        ],
    )
    assert (
        cfg.methods["kvcomm"]["receiver_mask"] == "public"
        and cfg.methods["q"]["receiver_mask"] == "public"
    )
    assert cfg.methods["causal"]["receiver_mask"] == "causal"  # an explicit setting wins
    assert all(
        cfg.methods[m]["alpha"] == 1.0 and cfg.methods[m]["prior"] == "minmax"
        for m in ("kvcomm", "q", "causal")
    )
    assert "receiver_mask" not in cfg.methods["baseline"]  # it has none
    assert [t.metric for t in cfg.tasks] == [None, "rouge_l_recall_public", None]
    public = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: samsum_full, path: tests/fixtures/samsum.jsonl, n_test: 3, n_calib: 1}]",
        ],
    )
    ((test, calib),) = load_splits(public).values()
    assert {e.metric for e in test + calib} == {"rouge_l_recall_public"}
    saved = yaml.safe_load(dump_yaml(cfg))  # what the run directory's config.yaml holds
    assert (
        saved["preset"] == "kvcomm_public"
        and saved["methods"]["kvcomm"]["receiver_mask"] == "public"
    )
    assert (
        load_experiment("configs/tiny.yaml").methods["kvcomm"].get("receiver_mask") is None
    )  # default unchanged


def test_a_run_under_the_preset_scores_with_the_public_metric(tmp_path):
    import run_experiments
    from cross_model.metrics import score_prediction

    assert (
        run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--preset",
                "kvcomm_public",
                "--tasks",
                "[{name: samsum_full, path: tests/fixtures/samsum.jsonl, n_test: 3, n_calib: 1, max_new_tokens: 6}]",
                "--methods",
                '{"skyline": {}}',
                "--stages",
                "[evaluate, report]",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "tiny" / "results.json").read_text())["examples"]["samsum_full"][
        "skyline"
    ]
    assert len(rows) == 3
    for r in rows:
        assert (
            r["score"] == score_prediction("rouge_l_recall_public", r["answer"], r["gold"])["score"]
        )
        assert r["score"] == rouge_l_recall_public(r["answer"], r["gold"])
    saved = yaml.safe_load((tmp_path / "tiny" / "config.yaml").read_text())
    assert (
        saved["preset"] == "kvcomm_public"
        and saved["tasks"][0]["metric"] == "rouge_l_recall_public"
    )


def test_the_preset_reads_hotpotqa_and_musique_as_the_public_loaders_build_a_context(tmp_path):
    """HotpotQA: supporting sentences as stored (a leading space kept) joined by newlines; MuSiQue:
    supporting paragraphs without their titles. Same rows and ids, under the task's own label."""
    rows = [json.loads(line) for line in open("tests/fixtures/hotpotqa.jsonl")]
    rows[0]["context"]["sentences"][1][0] = (
        " " + rows[0]["context"]["sentences"][1][0]
    )  # as HotpotQA stores them
    hotpot = tmp_path / "hotpotqa.jsonl"
    hotpot.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = f"[{{name: hotpotqa, path: {hotpot}, n_test: 3, n_calib: 0}}, {{name: musique, path: tests/fixtures/musique.jsonl, n_test: 2, n_calib: 0}}]"
    ours = load_splits(load_experiment("configs/tiny.yaml", ["--tasks", tasks]))
    cfg = load_experiment("configs/tiny.yaml", ["--preset", "kvcomm_public", "--tasks", tasks])
    assert [(t.name, t.key) for t in cfg.tasks] == [
        ("hotpotqa_public", "hotpotqa"),
        ("musique_public", "musique"),
    ]
    public = load_splits(cfg)
    assert list(public) == list(ours) == ["hotpotqa", "musique"]
    by_id = {r["id"]: r for r in rows}
    for e, o in zip(public["hotpotqa"][0], ours["hotpotqa"][0]):
        r = by_id[e.example_id.split("-", 1)[1]]
        sents = dict(zip(r["context"]["title"], r["context"]["sentences"]))
        want = [
            sents[t][i]
            for t, i in zip(r["supporting_facts"]["title"], r["supporting_facts"]["sent_id"])
        ]
        assert (
            e.example_id == o.example_id
            and e.prompt_A == "\n".join(want)
            and o.prompt_A == " ".join(s.strip() for s in want)
        )
    assert any(e.prompt_A.startswith(" ") for e in public["hotpotqa"][0])  # the leading space kept
    musique = {
        json.loads(line)["id"]: json.loads(line) for line in open("tests/fixtures/musique.jsonl")
    }
    for e in public["musique"][0]:
        paragraphs = [
            p for p in musique[e.example_id.split("-", 1)[1]]["paragraphs"] if p["is_supporting"]
        ]
        assert e.prompt_A == "\n".join(p["paragraph_text"] for p in paragraphs)
        assert not any(e.prompt_A.startswith(p["title"] + ":") for p in paragraphs)


def test_cipher_under_the_preset_ends_a_message_only_at_the_tokenizers_eos():
    """The public CIPHER stops at the tokenizer's EOS; ours also at every id the generation config
    names (Llama-3-Instruct's <|eot_id|>). A model whose generation config adds an id shows the two."""
    import torch

    from cross_model.methods.cipher import message_eos_ids, vector_generate
    from cross_model.models import load_model

    lm = load_model("tiny-llama-64", torch.float32, "cpu")
    own = int(lm.tokenizer.eos_token_id)
    assert message_eos_ids(lm, "tokenizer") == [own]
    cfg = load_experiment("configs/tiny.yaml", ["--preset", "kvcomm_public"])
    assert cfg.methods["cipher"]["eos"] == "tokenizer" and "eos" not in cfg.methods["nld"]
    assert load_experiment("configs/tiny.yaml").methods["cipher"].get("eos") is None
    # Make the greedy-nearest token of a prompt's next step an "extra" EOS id: under `all` the message
    # ends at once (no vector), under `tokenizer` it goes on.
    emb = lm.model.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    first = lm.model(inputs_embeds=emb).logits[0, -1].argmax().item()
    assert first != own
    saved = lm.model.generation_config.eos_token_id
    try:
        lm.model.generation_config.eos_token_id = [own, first]
        lm.derived.pop("eos_token_ids", None)
        for key in [k for k in lm.derived if str(k).startswith("cipher_tables_")]:
            lm.derived.pop(key)
        stopped, _ = vector_generate(
            lm, emb, torch.ones(1, 3, dtype=torch.long), 4, 1e-4, eos_rule="all"
        )
        went_on, _ = vector_generate(
            lm, emb, torch.ones(1, 3, dtype=torch.long), 4, 1e-4, eos_rule="tokenizer"
        )
        assert stopped[0].shape[0] == 0 and went_on[0].shape[0] > 0
    finally:
        lm.model.generation_config.eos_token_id = saved
        lm.derived.pop("eos_token_ids", None)
        for key in [k for k in lm.derived if str(k).startswith("cipher_tables_")]:
            lm.derived.pop(key)


def test_the_public_blend_scales_the_depth_prior_to_zero_one():
    import math

    from cross_model.methods.kvcomm import blend_scores

    edge = math.exp(
        -0.5 * (1 / 10) ** 2
    )  # three layers, centre 1, sigma 10: the prior at layers 0 and 2
    assert blend_scores([0.0, 1.0, 2.0], 0.0, 0.5, 10.0) == [edge, 1.0, edge]
    assert blend_scores([0.0, 1.0, 2.0], 0.0, 0.5, 10.0, "minmax") == [0.0, 1.0, 0.0]
    assert blend_scores([0.0, 1.0, 2.0], 1.0, 0.5, 10.0, "minmax") == [
        0.0,
        0.5,
        1.0,
    ]  # alpha 1: the measurement alone


def test_the_public_countries_and_tip_sheets_runs_score_every_row_and_calibrate_on_test_item_0(
    tmp_path,
):
    """The public runs read the files whole and calibrate on the first test item; under the preset so
    do ours (written into the config, explicit settings winning), and the report says so."""
    import run_experiments

    tasks = (
        "[{name: countries, path: tests/fixtures/public/countries.jsonl},"
        " {name: tipsheets, path: tests/fixtures/public/tipsheets.jsonl, calibrate_on: calibration, n_test: 2, n_calib: 1}]"
    )
    cfg = load_experiment("configs/tiny.yaml", ["--preset", "kvcomm_public", "--tasks", tasks])
    assert [t.calibrate_on for t in cfg.tasks] == ["test_item_0", "calibration"]
    splits = load_splits(cfg)
    rows = [json.loads(x) for x in open("tests/fixtures/public/countries.jsonl") if x.strip()]
    test, calib = splits["countries"]
    assert [e.example_id for e in test] == [
        f"countries-{r['id']}" for r in rows
    ]  # every row, file order
    assert calib == test[:1]
    assert [len(part) for part in splits["tipsheets"]] == [2, 1]
    assert (
        load_experiment("configs/tiny.yaml", ["--tasks", tasks]).tasks[0].calibrate_on is None
    )  # ours by default

    assert (
        run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--preset",
                "kvcomm_public",
                "--tasks",
                "[{name: countries, path: tests/fixtures/public/countries.jsonl, max_new_tokens: 2}]",
                "--methods",
                '{"kvcomm": {"selection": "calibrate", "top_layers": 0.5}}',
            ]
        )
        == 0
    )
    run = tmp_path / "tiny"
    summary = json.loads((run / "results.json").read_text())["summary"]
    assert summary[0]["calibrated_on_test_item"] is True and summary[0]["n"] == len(rows)
    assert "**Calibrated on a test item** (countries)" in (run / "results.md").read_text()
    calibration = list(run.glob("calibration*/**/*.json")) + list(run.glob("calibration*.json"))
    assert calibration, "the calibrate stage ran"


def test_the_public_experiments_config_resolves_to_the_public_protocol():
    """configs/kvcomm_public.yaml: every public behaviour the preset sets, in the resolved config."""
    cfg = load_experiment("configs/kvcomm_public.yaml")
    assert cfg.preset == "kvcomm_public"
    assert [(t.name, t.calibrate_on, t.n_test) for t in cfg.tasks] == [
        ("countries", "test_item_0", None),
        ("tipsheets", "test_item_0", None),
    ]
    assert (
        cfg.methods["kvcomm"]["receiver_mask"] == "public" and cfg.methods["kvcomm"]["alpha"] == 1.0
    )
    assert cfg.methods["cipher"]["eos"] == "tokenizer"
    splits = load_splits(cfg)
    assert [len(splits[k][0]) for k in ("countries", "tipsheets")] == [6, 4]
    assert all(splits[k][1] == splits[k][0][:1] for k in splits)


def test_the_public_multi_sender_loaders_shuffle_then_filter_and_split_2wikimqa_by_passages(
    tmp_path,
):
    """hotpotqa_ms / musique_ms under the preset: shuffle(42), then keep rows with two or more
    supporting facts, then take the first n (the public order, not ours: filter, then shuffle);
    twowikimqa_ms: every LongBench row in file order, its "Passage N:" blocks halved between senders."""
    import datasets

    from cross_model.data import load_task_examples
    from tests.helpers import distinct_copies

    rows = [json.loads(line) for line in open("tests/fixtures/hotpotqa.jsonl")]
    many = distinct_copies(rows, 120)
    for k, r in enumerate(many):  # every third row keeps a single supporting fact: filtered out
        if k % 3 == 0:
            r["supporting_facts"] = {
                "title": r["supporting_facts"]["title"][:1],
                "sent_id": r["supporting_facts"]["sent_id"][:1],
            }
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in many))
    test, _ = load_task_examples("hotpotqa_ms_public", 20, 0, path=str(path))
    shuffled = datasets.load_dataset("json", data_files=str(path), split="train").shuffle(seed=42)
    want = [r["id"] for r in shuffled if len(r["supporting_facts"]["title"]) >= 2][:20]
    assert [e.example_id for e in test] == [f"hotpotqa_ms_public-{i}" for i in want]
    ours, _ = load_task_examples("hotpotqa_ms", 20, 0, path=str(path))
    assert [e.example_id.split("-", 1)[1] for e in ours] != want  # filter-then-shuffle: other items
    cfg = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: twowikimqa_ms, path: tests/fixtures/twowikimqa_longbench.jsonl, n_calib: 0}]",
        ],
    )
    assert cfg.tasks[0].name == "twowikimqa_ms_public"
    ((two, _),) = load_splits(cfg).values()
    assert [e.example_id for e in two] == [
        "twowikimqa_ms_public-tw0",
        "twowikimqa_ms_public-tw1",
        "twowikimqa_ms_public-tw2",
    ]
    first = two[0]
    assert first.prompt_A == (
        "Passage 1:\nBlue Harbour\nBlue Harbour is a 1999 film directed by Ana Reyes.\n"
        "Passage 2:\nAna Reyes\nAna Reyes is a Chilean director, daughter of Tom Reyes.\n"
    )
    assert first.more_senders == (
        "Passage 3:\nNoise Film\nNoise Film is a studio.\nPassage 4:\nTom Reyes\n"
        "Tom Reyes was a painter.\nPassage 5:\nHarbour Lights\nHarbour Lights is a song.",
    )
    assert (
        first.prompt_B == "Who is the father of the director of film Blue Harbour?"
        and first.answers == ("Tom Reyes",)
    )


def test_the_full_tasks_read_every_row_in_the_splits_order_as_the_public_loaders_without_n_samples():
    from cross_model.data import get_task, load_task_examples

    hotpot = [json.loads(line) for line in open("tests/fixtures/hotpotqa.jsonl")]
    test, calib = load_task_examples("hotpotqa_full", None, 0, path="tests/fixtures/hotpotqa.jsonl")
    assert [e.example_id for e in test] == [
        f"hotpotqa_full-{r['id']}" for r in hotpot
    ] and calib == []
    public, _ = load_task_examples("hotpotqa_public", 3, 0, path="tests/fixtures/hotpotqa.jsonl")
    assert {e.prompt_A for e in test} == {
        e.prompt_A for e in public
    }  # the public reading of each row
    musique = [json.loads(line) for line in open("tests/fixtures/musique.jsonl")]
    test, _ = load_task_examples("musique_full", None, 0, path="tests/fixtures/musique.jsonl")
    assert [e.example_id for e in test] == [f"musique_full-{r['id']}" for r in musique]
    assert get_task("hotpotqa_full").train is None


def test_the_public_mixed_task_reads_every_row_of_both_files_at_ten_new_tokens():
    cfg = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: countries_tipsheets_shuffled, path: tests/fixtures/public}]",
        ],
    )
    assert (cfg.tasks[0].calibrate_on, cfg.tasks[0].max_new_tokens) == ("test_item_0", 10)
    ((test, calib),) = load_splits(cfg).values()
    countries = sum(1 for x in open("tests/fixtures/public/countries.jsonl") if x.strip())
    tips = sum(1 for x in open("tests/fixtures/public/tipsheets.jsonl") if x.strip())
    assert len(test) == countries + tips and {e.max_new_tokens for e in test} == {10}
    assert {e.task for e in test} == {"countries", "tipsheets"} and calib == test[:1]


def test_longbench_multifieldqa_and_2wikimqa_read_every_row_in_file_order_under_the_preset():
    rows = [json.loads(x) for x in open("tests/fixtures/qasper.jsonl")]
    cfg = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: multifieldqa_en, path: tests/fixtures/qasper.jsonl}]",
        ],
    )
    assert (cfg.tasks[0].name, cfg.tasks[0].key, cfg.tasks[0].calibrate_on) == (
        "multifieldqa_en_public",
        "multifieldqa_en",
        "test_item_0",
    )
    ((test, calib),) = load_splits(cfg).values()
    assert [e.example_id for e in test] == [
        f"multifieldqa_en_public-{r['_id']}" for r in rows
    ] and calib == test[:1]


def test_the_preset_builds_the_public_prompt_families_for_math_code_and_summaries():
    """TMATH "Hint:", RepoBench "Code Snippet:" under "Complete ONLY THE NEXT LINE", SAMSum's content
    parts (and "Content:" for B alone), as the public templates; ours without the preset."""
    from cross_model.methods.debate import DebateParams, first_sender_text
    from cross_model.prompting import baseline_text, receiver_text, sender_text, skyline_text

    tasks = (
        "[{name: tmath, path: tests/fixtures/public/TMATH, n_test: 2, n_calib: 1},"
        " {name: repobench, path: tests/fixtures/repobench.jsonl, n_test: 2, n_calib: 1},"
        " {name: samsum, path: tests/fixtures/samsum.jsonl, n_test: 2, n_calib: 1}]"
    )
    preset = load_experiment("configs/tiny.yaml", ["--preset", "kvcomm_public", "--tasks", tasks])
    assert {t.prompts for t in preset.tasks} == {"public"}  # in the resolved config
    public = load_splits(preset)
    ours = load_splits(load_experiment("configs/tiny.yaml", ["--tasks", tasks]))
    m, c, s = (public[k][0][0] for k in ("tmath", "repobench", "samsum"))
    assert (
        sender_text(m) == f"Instruction: Answer the math problem step by step. Hint: {m.prompt_A}"
    )
    assert (
        skyline_text(m)
        == f"Instruction: Answer the math problem step by step. Hint: {m.prompt_A} Question: {m.prompt_B}"
    )
    code = "Instruction: Complete ONLY THE NEXT LINE of the code snippet based on the context."
    assert receiver_text(c) == baseline_text(c) == f"{code} Code Snippet: {c.prompt_B}"
    assert sender_text(c) == f"{code} Context: {c.prompt_A}"
    summary = "Instruction: Summarize the following content concisely with one sentence."
    assert sender_text(s) == f"{summary} Content part 1: {s.prompt_A}"
    assert (
        receiver_text(s) == f"{summary} Content part 2: {s.prompt_B}"
        and baseline_text(s) == f"{summary} Content: {s.prompt_B}"
    )
    assert first_sender_text(m, DebateParams(sender_aware=True)).startswith(
        "Instruction: Summarize the hint in a concise way, as it will be used by another agent"
    )
    mine = ours["repobench"][0][0]
    assert receiver_text(mine) == baseline_text(mine) and "Code Snippet" not in receiver_text(mine)
    assert receiver_text(mine).endswith(f" Question: {mine.prompt_B}")


def test_qasper_under_the_preset_is_scrolls_split_at_the_first_blank_line():
    cfg = load_experiment(
        "configs/tiny.yaml",
        [
            "--preset",
            "kvcomm_public",
            "--tasks",
            "[{name: qasper, path: tests/fixtures/scrolls_qasper.jsonl, n_test: 3, n_calib: 0}]",
        ],
    )
    assert (cfg.tasks[0].name, cfg.tasks[0].key) == ("qasper_public", "qasper")
    ((test, _),) = load_splits(cfg).values()
    by_id = {e.example_id: e for e in test}
    two = by_id["qasper_public-q1_1"]
    assert (two.prompt_B, two.prompt_A, two.answers) == (
        "How many layers does the encoder have?",
        "The encoder has 12 layers.\n\nThe decoder has 6.",
        ("twelve",),
    )
    assert by_id["qasper_public-q1_0"].answers == ("12",) and two.max_new_tokens == 128
