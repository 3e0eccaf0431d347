"""Task generators and loaders: determinism, disjoint splits, and parsing of the hubs' record formats."""

import json

import pytest

from cross_model.data import available_tasks, get_task, load_task_examples
from cross_model.data.corpus import load_corpus
from cross_model.metrics import score_prediction
from tests.conftest import ROOT

FIX = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize("task", ["countries", "tipsheets"])
def test_generators_are_deterministic_and_splits_disjoint(task):
    a_test, a_cal = load_task_examples(task, 50, 10, seed=7)
    b_test, b_cal = load_task_examples(task, 50, 10, seed=7)
    assert a_test == b_test and a_cal == b_cal
    c_test, _ = load_task_examples(task, 50, 10, seed=8)
    assert [e.prompt_A for e in c_test] != [e.prompt_A for e in a_test]
    assert not {e.example_id for e in a_test} & {e.example_id for e in a_cal}
    # calibration content never repeats a test item either
    assert not {(e.prompt_A, e.prompt_B) for e in a_test} & {
        (e.prompt_A, e.prompt_B) for e in a_cal
    }
    assert len({e.example_id for e in a_test}) == 50


def test_default_sizes_and_shapes():
    countries, _ = load_task_examples("countries")
    tips, _ = load_task_examples("tipsheets")
    assert len(countries) == 200 and len(tips) == 500
    e = countries[0]
    person = e.meta["person"]
    assert e.prompt_A == f"{person} is at the {e.meta['landmark']}."
    assert e.prompt_B == f"Which country is {person} located in?"
    t = tips[0]
    assert t.answers[0] in t.prompt_A and all(c in t.prompt_B for c in t.meta["candidates"])


def test_countries_test_items_do_not_depend_on_calibration_size():
    a, _ = load_task_examples("countries", 20, 0, seed=1)
    b, _ = load_task_examples("countries", 20, 30, seed=1)
    assert a == b


def test_too_many_items_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds"):
        load_task_examples("countries", 5000, 10)


def test_max_new_tokens_override():
    test, _ = load_task_examples("countries", 3, 0, max_new_tokens=16)
    assert {e.max_new_tokens for e in test} == {16}


EXPECTED = {
    "hotpotqa": (
        "The Eiffel Tower is in France. Its capital is Paris.",
        "Which city is the capital of the country where the Eiffel Tower is?",
        ("Paris",),
    ),
    "musique": (
        "Matterhorn: The Matterhorn lies in Switzerland.",
        "In which country is the Matterhorn?",
        ("Switzerland",),
    ),
    "qasper": ("The encoder has 12 layers.", "How many layers?", ("12",)),
    "squad": ("The game was played in Santa Clara.", "Where was it played?", ("Santa Clara",)),
}


@pytest.mark.parametrize(
    "task,file",
    [
        ("hotpotqa", "hotpotqa"),
        ("musique", "musique"),
        ("qasper", "qasper"),
        ("multifieldqa_en", "qasper"),
        ("twowikimqa", "qasper"),
        ("squad", "squad"),
        ("gsm8k", "gsm8k"),
    ],
)
def test_hub_loaders_parse_their_record_format(task, file):
    test, calib = load_task_examples(task, 2, 1, path=str(FIX / f"{file}.jsonl"))
    assert len(test) == 2 and len(calib) == 1
    everything = test + calib
    assert not {e.example_id for e in test} & {e.example_id for e in calib}
    by_b = {e.prompt_B: e for e in everything}
    if file in EXPECTED:
        prompt_a, prompt_b, answers = EXPECTED[file]
        assert by_b[prompt_b].prompt_A == prompt_a
        assert by_b[prompt_b].answers == answers
    if task == "gsm8k":
        golds = sorted(e.answers[0] for e in everything)
        assert golds == ["10", "3,600", "72"]
        assert all(e.prompt_A == e.prompt_B for e in everything) and everything[0].kind == "math"
    if task == "musique":
        e = by_b["What river flows through Cairo?"]
        assert e.answers == ("Nile", "the Nile") and "Unrelated" not in e.prompt_A
    # the papers' subset: shuffled with seed 42 -> the same order every time
    again, _ = load_task_examples(task, 2, 1, path=str(FIX / f"{file}.jsonl"))
    assert again == test


def test_hotpotqa_uses_only_supporting_sentences():
    test, calib = load_task_examples("hotpotqa", 3, 0, path=str(FIX / "hotpotqa.jsonl"))
    for e in test:
        assert (
            "Noise" not in e.prompt_A and "Other." not in e.prompt_A and "Zero." not in e.prompt_A
        )


def test_hub_without_network_says_how_to_use_a_local_copy():
    with pytest.raises(FileNotFoundError, match="set the task's `path`"):
        load_task_examples("hotpotqa", 2, 0)


def test_jsonl_and_tmath():
    test, calib = load_task_examples("jsonl", 10, 5, path=str(FIX / "custom.jsonl"))
    assert [e.example_id for e in test] == ["jsonl-a", "jsonl-b"] and [
        e.example_id for e in calib
    ] == ["jsonl-c"]
    assert test[1].answers == ("under the mat",) and test[1].max_new_tokens == 8
    t, _ = load_task_examples("tmath", 2, 0, path=str(FIX / "tmath.jsonl"))
    assert (
        t[0].metric == "rouge_l_recall"
        and "What is 4 * 2?" in t[0].prompt_A
        and t[0].prompt_B == "What is 3 + 4 * 2?"
    )


def test_jsonl_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_A": "x", "answers": ["y"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record lacks prompt_B"):
        load_task_examples("jsonl", 1, 0, path=str(bad))
    with pytest.raises(ValueError, match="set `path`"):
        load_task_examples("jsonl", 1, 0)


def test_registry_lists_the_papers_tasks():
    assert {
        "countries",
        "tipsheets",
        "hotpotqa",
        "musique",
        "qasper",
        "multifieldqa_en",
        "twowikimqa",
        "squad",
        "gsm8k",
        "tmath",
        "jsonl",
    } <= set(available_tasks())
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task_examples("nope")


def test_corpus_offline_is_deterministic_and_c4_fails_clearly(tmp_path):
    a = load_corpus("offline", 100, seed=3)
    assert a == load_corpus("offline", 100, seed=3) and a != load_corpus("offline", 100, seed=4)
    assert len(set(a)) > 80
    (tmp_path / "t.txt").write_text(
        "One two three four. Five six seven eight. Nine ten eleven twelve."
    )
    assert sorted(load_corpus("local", 3, 0, str(tmp_path))) == sorted(
        ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve."]
    )
    with pytest.raises(FileNotFoundError, match="train.corpus"):
        load_corpus("c4", 10, 0)


# --- the public KVComm code's data files (fixtures in its formats, written by us) ------------------

PUBLIC = FIX / "public"


def test_public_countries_file_is_read_as_the_public_loader_reads_it():
    test, calib = load_task_examples("countries", 3, 2, path=str(PUBLIC / "countries.jsonl"))
    lines = [json.loads(x) for x in (PUBLIC / "countries.jsonl").read_text().splitlines()]
    assert [e.example_id for e in test] == [
        f"countries-{r['id']}" for r in lines[:3]
    ]  # file order, no sampling
    assert [e.example_id for e in calib] == [f"countries-{r['id']}" for r in lines[-2:]]
    e, row = test[1], lines[1]
    # The instruction is appended with no space, as the public loader does.
    assert (
        e.prompt_B
        == row["prompt_B"] + "You are required to extrapolate the country from the context."
    )
    assert (
        e.prompt_A == row["prompt_A"] and e.answers == (row["country"],) and e.max_new_tokens == 5
    )
    assert set(e.meta["candidates"]) == {r["country"] for r in lines}
    with pytest.raises(ValueError, match="exceeds the 6 records"):
        load_task_examples("countries", 5, 2, path=str(PUBLIC / "countries.jsonl"))


def test_public_tipsheets_file_gives_label_answers_and_option_candidates():
    test, calib = load_task_examples("tipsheets", 3, 1, path=str(PUBLIC / "tipsheets.jsonl"))
    lines = [json.loads(x) for x in (PUBLIC / "tipsheets.jsonl").read_text().splitlines()]
    assert [e.answers for e in test + calib] == [(r["label"],) for r in lines]
    assert [e.meta["candidates"] for e in test] == [r["options"] for r in lines[:3]]
    assert test[0].prompt_B == lines[0]["prompt_B"] and test[0].max_new_tokens == 10


def test_public_tmath_directory_is_sampled_as_shuffle_seed_42_select(tmp_path):
    import numpy as np

    test, calib = load_task_examples("tmath", 3, 1, path=str(PUBLIC / "TMATH"))
    # The files in the public area order, then by number; datasets' shuffle(seed=42) is this permutation.
    files = [
        "algebra-hint_1",
        "algebra-hint_2",
        "algebra-hint_10",
        "geometry-hint_3",
        "geometry-hint_7",
    ]
    order = [files[i] for i in np.random.default_rng(42).permutation(len(files))]
    # test from the front, calibration from the back (a source this small keeps no fixed reserve)
    assert [e.example_id for e in test + calib] == [f"tmath-{f}" for f in order[:3] + order[-1:]]
    e = test[0]
    area, n = order[0].split("-hint_")
    assert e.prompt_B == f"{area} problem {n}" and e.answers == (f"The {area} answer {n}.",)
    assert (
        e.prompt_A == f"What is step one of {area} {n}?\nAnd then?" and e.metric == "rouge_l_recall"
    )
    with pytest.raises(ValueError, match="no hint_<area>"):
        (tmp_path / "hint_algebra").mkdir()
        load_task_examples("tmath", 1, 0, path=str(tmp_path))


# --- the public code's other tasks and its mixed task ----------------------------------------------


def test_repobench_splits_cross_file_and_in_file_code_and_filters_long_contexts():
    import numpy as np

    rows = [json.loads(x) for x in (FIX / "repobench.jsonl").read_text().splitlines()]
    test, calib = load_task_examples("repobench", 3, 1, path=str(FIX / "repobench.jsonl"))
    kept = [
        r for r in rows if r["repo_name"] != "org/huge"
    ]  # its cross-file context is >= 5000 chars
    order = [
        kept[i] for i in np.random.default_rng(42).permutation(len(kept))
    ]  # filter, then shuffle(seed=42)
    assert [e.answers for e in test + calib] == [(r["next_line"],) for r in order[:3] + order[-1:]]
    e, r = test[0], order[0]
    assert e.prompt_A.startswith(
        f"# Repo Name: {r['repo_name']}\n# Path: {r['context'][0]['path']}\n"
    )
    assert "\n\n\n\n" not in e.prompt_A and "CONST_" in e.prompt_A
    assert e.prompt_B == (
        f"# Path: {r['file_path']}\n{r['import_statement']}\n{r['cropped_code']}\n"
        "\nHere's the next line of code based on the context:"
    )
    assert e.metric == "edit_similarity" and e.kind == "code" and e.max_new_tokens == 100
    full, _ = load_task_examples("repobench_full", None, 0, path=str(FIX / "repobench.jsonl"))
    assert [x.answers for x in full] == [
        (r["next_line"],) for r in kept
    ]  # every kept row, in order


def test_samsum_splits_the_dialogue_in_halves():
    test, _ = load_task_examples("samsum_full", None, 0, path=str(FIX / "samsum.jsonl"))
    assert len(test) == 4 and [e.example_id for e in test] == [
        "samsum_full-13818513",
        "samsum_full-13728867",
        "samsum_full-13681000",
        "samsum_full-13730747",
    ]
    e = test[2]  # six lines: three to each agent
    assert (
        e.prompt_A
        == "Tim: Hi, what's up?\nKim: Bad mood tbh, I was going to do lots of stuff but ended up procrastinating\nTim: What did you plan on doing?"
    )
    assert e.prompt_B.startswith("Kim: Oh you know") and e.prompt_B.endswith("Tim: Good luck")
    assert e.answers == ("Kim may try to do her chores tomorrow.",) and e.metric == "rouge_l_recall"
    assert e.max_new_tokens == 300 and e.kind == "summary"
    assert (
        test[0].prompt_A == "Amanda: I baked cookies. Do you want some?"
    )  # three lines: one to A, two to B
    sampled, calib = load_task_examples("samsum", 2, 1, path=str(FIX / "samsum.jsonl"))
    assert {x.answers for x in sampled + calib} <= {x.answers for x in test}


def test_mixed_countries_tipsheets_concatenated_and_shuffled():
    import numpy as np

    cat, cat_calib = load_task_examples("countries_tipsheets", 3, 2, seed=4)
    c, c_calib = load_task_examples("countries", 3, 2, seed=4)
    t, t_calib = load_task_examples("tipsheets", 3, 2, seed=4)
    assert cat == c + t and cat_calib == c_calib + t_calib
    shuffled, _ = load_task_examples("countries_tipsheets_shuffled", 3, 2, seed=4)
    assert shuffled == [cat[i] for i in np.random.default_rng(42).permutation(6)]
    assert {e.task for e in shuffled} == {"countries", "tipsheets"}
    public, _ = load_task_examples("countries_tipsheets", 2, 1, path=str(PUBLIC))
    assert [e.example_id for e in public[:2]] == ["countries-p1", "countries-p2"]
    assert public[2].example_id.startswith("tipsheets-line")


def test_twowikimqa_multi_sender_reads_the_supporting_sentences_by_title_and_index():
    test, _ = load_task_examples("twowikimqa_ms", 3, 0, path=str(FIX / "twowikimqa.jsonl"))
    by_id = {e.example_id: e for e in test}
    # w4 has one supporting fact, so it is not a multi-sender item; w3's three facts split one / two.
    assert set(by_id) == {"twowikimqa_ms-w1", "twowikimqa_ms-w2", "twowikimqa_ms-w3"}
    assert by_id["twowikimqa_ms-w1"].contexts == (
        "It was directed by Ana Reyes.",
        "Her father is Tom Reyes.",
    )
    assert by_id["twowikimqa_ms-w3"].contexts == (
        "Lia Moss is the daughter of Carl Moss.",
        "Carl Moss is the son of Edna Moss. He lived in Leeds.",
    )
    assert by_id["twowikimqa_ms-w1"].answers == ("Tom Reyes",)


def test_multi_sender_tasks_split_the_supporting_facts_between_two_senders(tmp_path):
    rows = [json.loads(x) for x in (FIX / "hotpotqa.jsonl").read_text().splitlines()]
    test, _ = load_task_examples("hotpotqa_ms", 3, 0, path=str(FIX / "hotpotqa.jsonl"))
    single, _ = load_task_examples("hotpotqa", 3, 0, path=str(FIX / "hotpotqa.jsonl"))
    by_q = {r["question"]: r for r in rows}
    for e, s in zip(test, single):  # the same items, the same order (both shuffled with seed 42)
        assert e.prompt_B == s.prompt_B and len(e.contexts) == 2
        assert " ".join(e.contexts) == s.prompt_A  # two supporting facts: one to each sender
        assert (
            e.prompt_A in s.prompt_A
            and e.more_senders[0] in s.prompt_A
            and by_q[e.prompt_B]["answer"] in e.answers
        )
    # Items with fewer than two supporting paragraphs are not multi-sender items.
    musique = tmp_path / "musique.jsonl"
    lines = (FIX / "musique.jsonl").read_text().splitlines()
    two = json.loads(lines[0])
    two["paragraphs"] = [{**p, "is_supporting": True} for p in two["paragraphs"]]
    musique.write_text("\n".join([json.dumps(two), *lines[1:]]) + "\n")
    (m,), _ = load_task_examples("musique_ms", 1, 0, path=str(musique))
    assert m.prompt_A == "Noise: Unrelated text." and m.more_senders == (
        "Apple: Apple was founded by Steve Jobs.",
    )
    with pytest.raises(ValueError, match="exceeds the 1 rows"):
        load_task_examples("musique_ms", 2, 0, path=str(musique))


@pytest.mark.parametrize(
    "name,label_of",
    [
        ("sst2", lambda r: ["negative", "positive"][r["label"]]),
        (
            "ag_news",
            lambda r: [["World"], ["Sports"], ["Business"], ["Science", "Technology"]][r["label"]],
        ),
        (
            "trec",
            lambda r: ["abbreviation", "entity", "description", "human", "location", "number"][
                r["coarse_label"]
            ],
        ),
    ],
)
def test_latentwires_classification_tasks_read_their_hub_formats(name, label_of):
    """SST-2, AG News and TREC (LatentWire's datasets beyond SQuAD) from fixtures in the hubs' record
    formats: A reads the text, B is asked for its label, the gold is the label's name and the
    candidates are every label's (for first-named)."""
    rows = [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text().splitlines()]
    test, _ = load_task_examples(name, len(rows), 0, path=str(FIX / f"{name}.jsonl"))
    by_text = {r.get("sentence", r.get("text")).strip(): r for r in rows}
    assert len(test) == len(rows)
    for e in test:
        row = by_text[e.prompt_A.removeprefix("Question: ")]
        gold = label_of(row)
        assert list(e.answers) == (gold if isinstance(gold, list) else [gold])
        assert set(e.answers) <= set(e.meta["candidates"]) and e.prompt_A not in e.prompt_B
        assert (
            score_prediction(e.metric, e.answers[0], e.answers, e.meta["candidates"])["first_named"]
            == 1.0
        )


def test_hub_tasks_with_a_training_split_train_on_it(monkeypatch):
    """Without a local copy, squad, sst2, ag_news, trec, hotpotqa and gsm8k hand out training rows from
    their own training split (SQuAD's 87,599 train rows for the paper-scale config), in its seed-42
    order, never from the evaluated split. The hub cannot be reached here: `load_rows` is replaced by
    the fixture's rows, and the test checks which split was asked for."""
    import datasets

    from cross_model.data import hub
    from cross_model.data.training_rows import task_rows

    asked = []
    rows = [json.loads(line) for line in (FIX / "sst2.jsonl").read_text().splitlines()]

    def fake_load_rows(source, local_path):
        asked.append((source.path, source.split, local_path))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(hub, "load_rows", fake_load_rows)
    train = task_rows("sst2", 3, 0, None)
    assert asked == [("stanfordnlp/sst2", "train", None)]
    order = datasets.Dataset.from_list(rows).shuffle(seed=hub.SHUFFLE_SEED)
    assert [e.prompt_A for e in train] == [order[i]["sentence"].strip() for i in range(3)]
    with pytest.raises(ValueError, match="6 training rows asked, stanfordnlp/sst2 .* train has 5"):
        task_rows("sst2", 6, 0, None)
    for name in ("squad", "hotpotqa", "gsm8k", "ag_news", "trec"):
        assert "training rows from train" in get_task(name).description


@pytest.mark.parametrize(
    "text,letter",
    [
        (" B", "B"),
        ("The correct answer is C.", "C"),
        ("Answer: D) the last one", "D"),
        ("answer: the second, B", "B"),  # a cue, then the first capital letter after it
        ("The correct answer is: A/B/C/D", "A"),
        ("It is a dog", "A"),  # C2C's lone-letter rule takes any case: the article counts as A
        ("x = 2 + b", None),  # arithmetic without a word of answering: no letter
        ("The answer: 2 + b", "B"),  # ... unless it answers
        ("C) blue, D) red", "D"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_choice_letters_are_extracted_by_c2cs_rules(text, letter):
    from cross_model.metrics import choice_letter, extract_choice_letter

    assert extract_choice_letter(text) == letter
    assert choice_letter(text, ["B", "text"]) == float(letter == "B")


@pytest.mark.parametrize(
    "name,golds",
    [
        # MMLU-Redux: the `no_correct_answer` and `expert` rows are left out; `wrong_groundtruth` rows take
        # their corrected answer (a letter, or a digit)
        (
            "mmlu_redux",
            {
                "Which planet is known as the Red Planet?": "B",
                "What is the closest star to the Earth?": "C",
                "Which of these is a virus?": "B",
                "Which is the most populous continent?": "B",
            },
        ),
        # ARC: the row keyed "3" (labels 1-4) is left out; a five-choice row keeps its five
        ("arc_challenge", {"Which tool is best for measuring the mass of a rock?": "A"}),
        ("openbookqa", {"Predators eat": "C", "There is most likely going to be fog around:": "A"}),
    ],
)
def test_c2cs_benchmarks_read_their_hub_formats_and_ask_in_c2cs_template(name, golds):
    from cross_model.data.multiple_choice import TEMPLATE
    from cross_model.prompting import receiver_text

    path = str(FIX / f"{name}.jsonl")
    rows = [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text().splitlines()]
    kept = {"mmlu_redux": 4, "arc_challenge": 3, "openbookqa": 3}[name]
    test, _ = load_task_examples(name, None, 0, path=path)  # every row, as C2C evaluates them
    assert len(test) == kept  # the left-out rows are not items
    assert [e.prompt_A.split("\n\nChoices:")[0] for e in test] == [
        r.get("question", r.get("question_stem"))
        for r in rows
        if r.get("question", r.get("question_stem"))
        in {x.prompt_A.split("\n\nChoices:")[0] for x in test}
    ]  # file order
    for e in test:
        question = e.prompt_A.split("\n\nChoices:\n")[0]
        row = next(r for r in rows if r.get("question", r.get("question_stem")) == question)
        choices = row["choices"] if isinstance(row["choices"], list) else row["choices"]["text"]
        block = "".join(f"{'ABCDE'[i]}. {c}\n" for i, c in enumerate(choices))
        assert receiver_text(e) == e.prompt_B == TEMPLATE.format(question=question, choices=block)
        assert "\n\n\nInstructions:" in e.prompt_B and e.prompt_B.endswith("The correct answer is")
        if question in golds:
            assert e.answers[0] == golds[question]
        assert (
            e.answers[1] == choices["ABCD".index(e.answers[0])] and e.meta["candidates"] == choices
        )
        assert (
            score_prediction(e.metric, f" {e.answers[0]}", e.answers, e.meta["candidates"])["score"]
            == 1.0
        )


def test_mmlu_redux_reads_every_subject_config_and_labels_its_rows(monkeypatch):
    """From the hub, MMLU-Redux 2.0 is one config per subject: all 57 are read and concatenated, each row
    labelled with its subject. The hub cannot be reached here: `datasets.load_dataset` is replaced by
    the fixture's rows of the subject asked for, and the test checks which configs were asked."""
    import datasets

    from cross_model.data.hub import load_rows
    from cross_model.data.multiple_choice import MMLU_REDUX_SUBJECTS

    rows = [json.loads(line) for line in (FIX / "mmlu_redux.jsonl").read_text().splitlines()]
    asked = []

    def fake(path, name, split, revision=None):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(
            [{k: v for k, v in r.items() if k != "subject"} for r in rows if r["subject"] == name]
            or [{k: v for k, v in rows[0].items() if k != "subject"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    got = load_rows(get_task("mmlu_redux").source, None)
    assert [a[1] for a in asked] == list(MMLU_REDUX_SUBJECTS) and len(MMLU_REDUX_SUBJECTS) == 57
    assert {a[0] for a in asked} == {"edinburgh-dawg/mmlu-redux-2.0"} and {a[2] for a in asked} == {
        "test"
    }
    assert got[0]["subject"] == "abstract_algebra" and "virology" in set(got["subject"])


def test_only_tasks_training_on_their_evaluated_split_keep_a_test_region(monkeypatch, tmp_path):
    """SST-2 from the hub trains on its own train split, so more than 1000 of its evaluated rows can be
    test items (all but the calibration reserve); the same rows as a local copy, whose training rows
    come after the first 1000, keep the region, and so does a hub task without a training split. The
    hub cannot be reached here: `load_rows` returns 1500 rows in each task's record format."""
    import datasets

    from cross_model.data import hub
    from cross_model.data.hub import _LONGBENCH

    rows = {
        "stanfordnlp/sst2": [
            {"idx": i, "sentence": f"film {i} .", "label": i % 2} for i in range(1500)
        ],
        _LONGBENCH: [
            {"_id": str(i), "context": f"c{i}", "input": f"q{i}", "answers": ["a"]}
            for i in range(1500)
        ],
    }
    monkeypatch.setattr(
        hub, "load_rows", lambda source, local_path: datasets.Dataset.from_list(rows[source.path])
    )
    test, _ = load_task_examples("sst2", 1200, 0)
    assert len(test) == 1200 and len({e.example_id for e in test}) == 1200
    few, _ = load_task_examples("sst2", 10, 0)
    assert [e.example_id for e in few] == [
        e.example_id for e in test[:10]
    ]  # the split is the item's
    local = tmp_path / "sst2.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows["stanfordnlp/sst2"]))
    with pytest.raises(ValueError, match="exceeds the 1000 test rows"):
        load_task_examples("sst2", 1200, 0, path=str(local))
    with pytest.raises(
        ValueError, match="exceeds the 1000 test rows"
    ):  # no training split of its own
        load_task_examples("qasper", 1200, 0)
