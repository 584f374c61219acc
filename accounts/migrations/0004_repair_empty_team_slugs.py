"""Teams created before issue 12 with a name that slugifies to nothing ("!!!") have an empty slug,
which names no team in a URL (`/teams/` failed for their members). Give each a usable, unique one."""

from django.db import migrations


def repair(apps, schema_editor):  # type: ignore[no-untyped-def]
    Team = apps.get_model("accounts", "Team")
    taken = set(Team.objects.exclude(slug="").values_list("slug", flat=True))
    for team in Team.objects.filter(slug=""):
        slug, n = f"team-{team.pk}", 1
        while slug in taken:
            n += 1
            slug = f"team-{team.pk}-{n}"
        taken.add(slug)
        team.slug = slug
        team.save(update_fields=["slug"])


class Migration(migrations.Migration):
    dependencies = [("accounts", "0003_quotas_and_disk")]

    operations = [migrations.RunPython(repair, migrations.RunPython.noop)]
