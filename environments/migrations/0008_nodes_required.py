# The node columns become required once every row has one (0007 filled them). A migration of its
# own: PostgreSQL refuses to ALTER a table with the data migration's deferred FK checks pending.

import django.db.models.deletion

import environments.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("environments", "0007_nodes"),
    ]

    operations = [
        migrations.AlterField(
            model_name="environment",
            name="node",
            field=models.ForeignKey(default=environments.models.local_node_id, on_delete=django.db.models.deletion.PROTECT, related_name="environments", to="environments.node"),
        ),
        migrations.AlterField(
            model_name="keptworkspace",
            name="node",
            field=models.ForeignKey(default=environments.models.local_node_id, on_delete=django.db.models.deletion.PROTECT, related_name="kept_workspaces", to="environments.node"),
        ),
        migrations.AlterField(
            model_name="teamvolume",
            name="node",
            field=models.ForeignKey(default=environments.models.local_node_id, on_delete=django.db.models.deletion.PROTECT, related_name="team_volumes", to="environments.node"),
        ),
    ]
