"""Markdown leaderboards (and a JSON summary) from `harness run` output folders."""
from leaderboard.tables import model_summary, modality_means, render_markdown, summary_json, write_leaderboard

__all__ = ["model_summary", "modality_means", "render_markdown", "summary_json", "write_leaderboard"]
