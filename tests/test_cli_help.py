"""``featviz --help`` groups every command into a panel of ``featviz.cli.PANELS``, in that order."""

from typer.testing import CliRunner

from featviz.cli import PANELS, app


def test_every_command_has_a_panel_and_help_follows_the_panels():
    names = [i.name or i.callback.__name__.replace("_", "-") for i in app.registered_commands]
    placed = {n for group in PANELS.values() for n in group}
    assert set(names) <= placed, f"commands without a panel in featviz.cli.PANELS: {set(names) - placed}"
    assert all(i.rich_help_panel in PANELS for i in app.registered_commands)
    text = CliRunner().invoke(app, ["--help"], terminal_width=100).output
    positions = [text.index(panel) for panel in PANELS if any(n in names for n in PANELS[panel])]
    assert positions == sorted(positions)
    rows = [line.split()[1] for line in text.splitlines() if line.startswith("│ ") and len(line.split()) > 1]
    listed = [r for r in rows if r in names]
    assert listed.index("demo") < listed.index("inspect") < listed.index("embed") < listed.index("cam")


def test_option_help_keeps_its_brackets():
    """Rich reads ``[word]`` as markup: an option's help saying ``featviz[gpu]`` must escape it or lose it."""
    import typer
    from rich.text import Text

    def walk(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    helps = [(c.name, p.name, getattr(p, "help", None) or "") for c in walk(typer.main.get_command(app))
             for p in c.params]
    eaten = [(c, p) for c, p, h in helps if Text.from_markup(h).plain != h.replace("\\[", "[")]
    assert not eaten, f"option help whose [..] rich would swallow (escape it as \\\\[): {eaten}"
    text = CliRunner().invoke(app, ["tsne", "--help"], terminal_width=200).output
    assert "featviz[gpu]" in text
