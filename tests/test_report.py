"""evaluate.py's report.html and its subgroup (--by) and audit (--audit) tables, on small synthetic predictions."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import evaluate
from melanoma_audit import report_html
from melanoma_audit.report_subgroups import MIN_PER_CLASS
from melanoma_audit.result_files import AUDIT_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("metrics", "data", "roc", "calibration", "confusion", "training", "subgroups", "audit", "cam", "config")


class PageParser(HTMLParser):
    """Every tag with its attributes, and the section ids."""

    def __init__(self):
        super().__init__()
        self.tags, self.sections = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.sections.append(attrs.get("id"))


def parse_page(path):
    parser = PageParser()
    parser.feed(path.read_text())
    return parser


def section_html(page, anchor):
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def table_rows(fragment):
    """The cells of every body row of the tables in an HTML fragment, as text."""
    rows = re.findall(r"<tr>(.*?)</tr>", fragment, re.S)
    cells = [[re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows]
    return [row for row in cells if row]  # the header rows have none


@pytest.fixture()
def cohort(tmp_path):
    """300 out-of-fold predictions with signal, three folds, and a metadata CSV with sexes, ages, sites, patients
    and missing values; 20 predicted images are not in the metadata CSV at all."""
    rng = np.random.default_rng(7)
    n = 300
    names = [f"IMG_{i:04d}" for i in range(n)]
    targets = (rng.random(n) < 0.3).astype(int)
    probs = np.clip(0.3 * targets + 0.7 * rng.random(n), 0, 1)
    sex = rng.choice(["male", "female", None], n, p=[0.45, 0.45, 0.1])
    age = rng.choice([20.0, 29.0, 30.0, 44.0, 45.0, 60.0, 74.0, np.nan], n)
    age[:40] = 75.0  # the 75+ band: rows 0..39
    targets[:40] = 0
    targets[20:23] = 1  # ... with only 3 melanomas among its listed images: too few for an AUC
    site = rng.choice(["torso", "head/neck", None], n)
    site[40:50] = "palms/soles"  # a site of one class only
    targets[40:50] = 0
    meta = pd.DataFrame({
        "image_name": names, "patient_id": [f"P{i // 3}" for i in range(n)], "sex": sex, "age_approx": age,
        "anatom_site_general_challenge": site, "clinic": rng.choice([1, 2, 10], n),
    })  # fmt: skip
    meta.iloc[20:].to_csv(tmp_path / "meta.csv", index=False)  # IMG_0000..IMG_0019 are not listed
    pred = pd.DataFrame({"image_name": names, "fold": np.arange(n) % 3, "target": targets, "prob": probs})
    pred.to_csv(tmp_path / "oof_tiny.csv", index=False)
    # the training log train.py writes beside oof_<run>.csv: found by itself
    log = [
        {"fold": fold, "epoch": epoch, "train_loss": 0.7 - 0.1 * epoch, "valid_loss": 0.6, "auc": 0.6 + 0.05 * epoch,
         "seconds": 30.0}
        for fold in range(3) for epoch in (1, 2)
    ]  # fmt: skip
    (tmp_path / "metrics_tiny.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    return {"pred": pred, "meta": meta, "dir": tmp_path}


def write_audit_table(path):
    rows = [
        ["(all)", "all", 120, 30, 0.71, 0.6, 0.7, None, None, None],
        ["ruler_mark", "with", 40, 12, 0.65, 0.5, 0.75, None, None, None],
        ["ruler_mark", "without", 80, 18, 0.74, 0.66, 0.68, None, None, None],
        ["ruler_mark", "inserted ruler", 80, 18, 0.70, 0.72, 0.6, 7, 2, 0.0312],
    ]
    pd.DataFrame(rows, columns=list(AUDIT_COLUMNS)).to_csv(path, index=False)
    return rows


def report_args(cohort, out, *extra):
    return [
        "--pred", str(cohort["dir"] / "oof_tiny.csv"), "--out-dir", str(out), "--n-bootstrap", "30",
        "--meta-csv", str(cohort["dir"] / "meta.csv"), *extra,
    ]  # fmt: skip


def test_report_page_is_self_contained_with_every_section(cohort, tmp_path):
    audit_rows = write_audit_table(tmp_path / "audit.csv")
    out = tmp_path / "report"
    metrics = evaluate.main(report_args(cohort, out, "--by", "sex,age,site", "--audit", str(tmp_path / "audit.csv")))
    page_path = out / "report.html"
    page = page_path.read_text()
    parsed = parse_page(page_path)
    assert parsed.sections == list(SECTIONS)
    # every image is embedded as a PNG; nothing points outside the file, and there is no script
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 6  # ROC, PR, reliability, confusion, training curves, subgroups
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG_SIGNATURE
    links = [value for _, attrs in parsed.tags for key, value in attrs.items() if key in ("src", "href")]
    assert not [link for link in links if not link.startswith("data:")]
    assert not [tag for tag, _ in parsed.tags if tag in ("script", "link", "iframe")]
    # the headline numbers, as metrics.json has them
    headline = section_html(page, "metrics")
    low, high = metrics["roc_auc_ci95"]
    for value in (metrics["roc_auc"], low, high, metrics["average_precision"], metrics["pauc_above_80_tpr"]):
        assert f"{value:.4f}" in headline
    assert f"{metrics['at_threshold']['sensitivity']:.4f}" in headline
    assert f"{metrics['calibration']['brier']:.4f}" in headline
    # the data summary: counts, patients, folds with their AUCs
    pred = cohort["pred"]
    data = table_rows(section_html(page, "data"))
    assert ["images", "300"] in data and ["melanoma", str(int(pred["target"].sum()))] in data
    assert ["patients (with a patient_id)", str(cohort["meta"]["patient_id"].iloc[20:].nunique())] in data
    assert ["images without a patient_id (each its own patient)", "20"] in data
    for fold, rows in pred.groupby("fold"):
        auc = roc_auc_score(rows["target"], rows["prob"])
        assert [str(fold), str(len(rows)), str(rows["target"].sum()), f"{auc:.4f}"] in data
    # the training log summarised per fold; the audit table as audit.py wrote it
    assert table_rows(section_html(page, "training"))[0][:5] == ["0", "2", "2", "0.7000", "0.7000"]
    audit = table_rows(section_html(page, "audit"))
    assert [row[:5] for row in audit] == [[r[0], r[1], str(r[2]), str(r[3]), f"{r[4]:.3f}"] for r in audit_rows]
    assert audit[3][7:] == ["7", "2", "+0.0312"] and audit[0][7:] == ["", "", ""]
    # every --by name has its table, and a sentence says what each figure means
    subgroups = section_html(page, "subgroups")
    for title in ("sex", "age (age_approx)", "site (anatom_site_general_challenge)"):
        assert f"<h3>{title}</h3>" in subgroups
    assert page.count("<figcaption>") == 6
    assert "Not asked: pass --cam N" in section_html(page, "cam")
    assert "--model-path" in section_html(page, "config")


def test_subgroup_tables_count_and_flag(cohort, tmp_path):
    out = tmp_path / "report"
    evaluate.main(report_args(cohort, out, "--by", "sex,age,site,clinic"))
    subgroups = json.loads((out / "metrics.json").read_text())["subgroups"]
    assert subgroups["images_not_in_source"] == 20 and subgroups["min_per_class"] == MIN_PER_CLASS
    by = subgroups["by"]
    assert list(by) == ["sex", "age", "site", "clinic"]
    joined = cohort["pred"].merge(cohort["meta"].iloc[20:], on="image_name", how="left")

    def check_counts(name, values, expected_order):
        groups = by[name]["groups"]
        assert [group["group"] for group in groups] == expected_order
        for group in groups:
            rows = joined[values == group["group"]]
            assert (group["images"], group["melanoma"]) == (len(rows), int(rows["target"].sum()))
            assert group["benign"] == len(rows) - group["melanoma"]
            flagged = rows["prob"] >= 0.5
            if group["melanoma"]:
                assert group["sensitivity"] == pytest.approx(flagged[rows["target"] == 1].mean())
                assert group["true_positives"] == int(flagged[rows["target"] == 1].sum())
            if min(group["melanoma"], group["benign"]) >= MIN_PER_CLASS:
                assert group["auc"] == pytest.approx(roc_auc_score(rows["target"], rows["prob"]))
                low, high = group["auc_ci95"]
                assert low < group["auc"] < high and group["auc_note"] is None
            else:
                assert group["auc"] is None and group["auc_ci95"] is None
                assert f"{group['melanoma']} melanoma and {group['benign']} benign" in group["auc_note"]
        assert sum(group["images"] for group in groups) == len(joined)

    check_counts("sex", joined["sex"].fillna("unknown"), ["female", "male", "unknown"])
    # age bands: 29 is <30, 30 and 44 are 30-44, 74 is 60-74, 75 is 75+; missing (and unlisted images) unknown
    bands = pd.cut(
        joined["age_approx"], [0, 30, 45, 60, 75, 200], right=False, labels=["<30", "30-44", "45-59", "60-74", "75+"]
    )
    check_counts("age", bands.astype(object).fillna("unknown"), ["<30", "30-44", "45-59", "60-74", "75+", "unknown"])
    check_counts(
        "site",
        joined["anatom_site_general_challenge"].fillna("unknown"),
        ["head/neck", "palms/soles", "torso", "unknown"],
    )
    check_counts(
        "clinic", joined["clinic"].map(lambda v: "unknown" if pd.isna(v) else f"{v:g}"), ["1", "2", "10", "unknown"]
    )
    old = next(group for group in by["age"]["groups"] if group["group"] == "75+")
    assert old["melanoma"] == 3 and old["auc"] is None  # rows 0..39 minus the 20 unlisted: 3 melanomas
    palms = next(group for group in by["site"]["groups"] if group["group"] == "palms/soles")
    assert palms["melanoma"] == 0 and palms["sensitivity"] is None and palms["auc"] is None
    # the page says so instead of a number
    assert "too few for an AUC: 3 melanoma" in section_html((out / "report.html").read_text(), "subgroups")


def test_by_mistakes_are_one_sentence(cohort, tmp_path, capsys):
    cases = (
        (["--by", "sex,colour"], "--by colour"),
        (["--by", "sex", "--meta-csv", str(tmp_path / "absent.csv")], "--meta-csv"),
        (["--audit", str(cohort["dir"] / "meta.csv")], "audit.py --out"),
    )
    for extra, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(report_args(cohort, tmp_path / "r", *extra))
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in error and len(error.strip().splitlines()) == 1
        assert not (tmp_path / "r").exists()  # found before anything is written
    # --by without any metadata
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--pred", str(cohort["dir"] / "oof_tiny.csv"), "--out-dir", str(tmp_path / "r"), "--by", "sex"])
    assert exit_info.value.code == 2 and "--data-dir or --meta-csv" in capsys.readouterr().err


def test_stale_optional_figures_of_an_earlier_report_are_removed(cohort, tmp_path):
    out = tmp_path / "report"
    evaluate.main(report_args(cohort, out, "--by", "sex"))
    assert (out / "subgroups.png").is_file()
    evaluate.main(report_args(cohort, out, "--overwrite"))
    assert not (out / "subgroups.png").exists()
    assert "Not asked: pass --by" in section_html((out / "report.html").read_text(), "subgroups")


def test_subgroups_of_the_real_sample(real_data_dir, tmp_path):
    """--by sex,age,site on the real train.csv: the groups hold every image, missing values as unknown."""
    table = pd.read_csv(real_data_dir / "train.csv")
    rng = np.random.default_rng(0)
    probs = np.clip(0.3 * table["target"] + 0.7 * rng.random(len(table)), 0, 1)
    pd.DataFrame({"image_name": table["image_name"], "target": table["target"], "prob": probs}).to_csv(
        tmp_path / "pred.csv", index=False
    )
    metrics = evaluate.main([
        "--pred", str(tmp_path / "pred.csv"), "--out-dir", str(tmp_path / "r"), "--n-bootstrap", "20",
        "--by", "sex,age,site", "--data-dir", str(real_data_dir),
    ])  # fmt: skip
    sexes = {group["group"]: group["images"] for group in metrics["subgroups"]["by"]["sex"]["groups"]}
    assert sexes == table["sex"].fillna("unknown").value_counts().to_dict()
    for name in ("sex", "age", "site"):
        assert sum(group["images"] for group in metrics["subgroups"]["by"][name]["groups"]) == len(table)


def test_grad_cam_overlays_are_captioned_in_words():
    assert report_html.cam_caption(Path("cam/confident_02_ISIC_0007528.png")) == (
        "most confident correct #2",
        "ISIC_0007528",
    )
    assert report_html.cam_caption(Path("cam/wrong_10_img_3.png")) == ("most wrong #10", "img_3")
    assert report_html.cam_caption(Path("cam/other.png")) == ("other", "")
