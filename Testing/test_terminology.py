"""The segment terminology in Resources/ names entries that really exist in the contexts 3D Slicer ships.

Slicer's Segment Editor looks a segment's terminology up by context name, then category code,
then type code (and the anatomic region in the named anatomic context); an entry that is not in
the named context is not found by the terminology selector.  The tests cannot download
Slicer, so ``Testing/data/slicer_terminology_extract.json`` holds a verbatim extract of the
needed entries of Slicer 5.8's ``Modules/Loadable/Terminologies/Resources/*.json`` (source
paths, tag, commit and git blob ids inside).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from WeakLiverSegLib.data.terminology import COLORS_FILE, segment_styles

EXTRACT = Path(__file__).resolve().parent / "data" / "slicer_terminology_extract.json"


@pytest.fixture(scope="module")
def slicer_contexts() -> dict:
    data = json.loads(EXTRACT.read_text(encoding="utf-8"))
    assert data["_source"]["tag"].startswith("v5.8") and len(data["_source"]["commit"]) == 40
    out = {}
    for context in data["contexts"]:
        name = context.get("SegmentationCategoryTypeContextName") or context.get("AnatomicContextName")
        out[name] = context
    return out


def _code(entry) -> list:
    return [entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"]]


def find_type(contexts: dict, context_name: str, category: list, type_: list):
    """The Slicer type entry for (context, category code, type code), or None; codes compared on
    scheme + value, as Slicer's lookup does."""
    context = contexts.get(context_name)
    if context is None or "SegmentationCodes" not in context:
        return None
    for cat in context["SegmentationCodes"]["Category"]:
        if _code(cat)[:2] != list(category[:2]):
            continue
        for entry in cat.get("Type", []):
            if _code(entry)[:2] == list(type_[:2]):
                return cat, entry
    return None


def find_region(contexts: dict, context_name: str, region: list):
    context = contexts.get(context_name)
    if context is None or "AnatomicCodes" not in context:
        return None
    for entry in context["AnatomicCodes"]["AnatomicRegion"]:
        if _code(entry)[:2] == list(region[:2]):
            return entry
    return None


@pytest.mark.parametrize("label", ["liver", "tumor"])
def test_each_segment_names_an_entry_of_a_context_slicer_ships(slicer_contexts, label):
    term = segment_styles()[label]["terminology"]
    found = find_type(slicer_contexts, term["contextName"], term["category"], term["type"])
    assert found is not None, f"{COLORS_FILE} {label}: {term['type']} not in {term['category']} of {term['contextName']!r}"
    category, entry = found
    # Same meanings as Slicer, so the selector and DICOM SEG show the same words.
    assert _code(category) == term["category"] and _code(entry) == term["type"]
    if "anatomicRegion" in term:
        assert category.get("showAnatomy") is True, f"{label}: category {term['category']} takes no anatomic region"
        region = find_region(slicer_contexts, term["anatomicContextName"], term["anatomicRegion"])
        assert region is not None and _code(region) == term["anatomicRegion"]
    else:
        assert term.get("anatomicContextName") in slicer_contexts


def test_tumour_is_neoplasm_of_the_liver_in_the_dicom_master_list(slicer_contexts):
    term = segment_styles()["tumor"]["terminology"]
    assert term["type"] == ["SCT", "108369006", "Neoplasm"]
    assert term["contextName"] == "Segmentation category and type - DICOM master list"
    assert term["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    assert segment_styles()["tumor"]["terminology_entry"].startswith(
        "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~")


def test_the_general_anatomy_list_has_no_neoplasm_so_the_old_entry_was_wrong(slicer_contexts):
    """The defect of issue 20: the General Anatomy list's altered structures (copied whole) lack Neoplasm."""
    general = "Segmentation category and type - 3D Slicer General Anatomy list"
    altered = ["SCT", "49755003"]
    assert find_type(slicer_contexts, general, altered, ["SCT", "108369006"]) is None
    assert find_type(slicer_contexts, general, altered, ["SCT", "4147007"]) is not None  # it lists Mass
