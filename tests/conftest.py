"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def drawn_panels(monkeypatch) -> list[dict]:
    """Each call of ``monai_medcam.visualize.save_panels`` (which still draws) as ``{"titles": row
    titles, "notes": notes}``: what a person reads on the PNG panels."""
    import monai_medcam.visualize

    calls, real = [], monai_medcam.visualize.save_panels

    def spy(path, images, columns, row_titles=None, heatmaps=(), notes=None, heading="", edges=None):
        calls.append({"titles": row_titles, "notes": notes, "heading": heading, "edges": edges, "images": images, "columns": columns})
        return real(path, images, columns, row_titles, heatmaps, notes, heading, edges)

    monkeypatch.setattr(monai_medcam.visualize, "save_panels", spy)
    return calls
