"""The runtime columns now live on gpus.Run (copied there by gpus.0005)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('deployments', '0003_run'),
        ('gpus', '0005_runs_from_subjects'),
    ]

    operations = [
        migrations.RemoveField(
            model_name='deployment',
            name='command',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='error_message',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='exit_code',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='heartbeat_at',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='pid',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='process_started',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='runner_pid',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='started_at',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='stop_requested_at',
        ),
        migrations.RemoveField(
            model_name='deployment',
            name='stopped_at',
        ),
    ]
