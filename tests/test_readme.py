"""The README's node table lists exactly the registered nodes, with their real inputs and outputs."""

import re
from pathlib import Path

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

README = Path(__file__).resolve().parents[1] / "README.md"


def node_rows():
    text = README.read_text()
    section = text.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (.+?) \(`(\w+)`\) \| (.*?) \| (.*?) \|", line)
        if m:
            name, node_id, inputs, outputs = m.groups()
            rows[node_id] = (name, [i.strip() for i in inputs.split(",")], [o.strip() for o in outputs.split(",")])
    return rows


def test_readme_node_table_matches_registered_nodes():
    rows = node_rows()
    assert set(rows) == set(NODE_CLASS_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        name, inputs, outputs = rows[node_id]
        assert name == NODE_DISPLAY_NAME_MAPPINGS[node_id]
        declared = cls.INPUT_TYPES()
        assert inputs == list(declared.get("required", {})) + list(declared.get("optional", {}))
        assert outputs == list(cls.RETURN_TYPES)


def test_readme_lists_every_workflow():
    text = README.read_text()
    for path in (README.parent / "workflows").glob("*.json"):
        assert f"`{path.name}`" in text
