"""Suite results -> results.json (everything measured) and results.md (the table people read)."""

from __future__ import annotations

import json
from pathlib import Path


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def write(out_dir: Path, title: str, columns: list[tuple[str, str]], rows: list[dict], notes: list[str],
          meta: dict) -> tuple[Path, Path]:
    """`columns` are (row key, header) pairs; rows may hold more keys than the table shows (JSON keeps all)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"title": title, "meta": meta, "rows": rows, "notes": notes}, indent=1))
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "Setup: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(lines))
    return md_path, json_path
