"""The runtime columns now live on gpus.Run (copied there by gpus.0005)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tasks', '0005_run'),
        ('gpus', '0005_runs_from_subjects'),
    ]

    operations = [
        migrations.RemoveField(
            model_name='finetuningtask',
            name='command',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='error_message',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='exit_code',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='finished_at',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='heartbeat_at',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='host',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='master_port',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='pid',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='process_started',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='queued_at',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='runner_pid',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='started_at',
        ),
        migrations.RemoveField(
            model_name='finetuningtask',
            name='stop_requested_at',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='command',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='error_message',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='exit_code',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='finished_at',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='host',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='pid',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='process_started',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='runner_pid',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='started_at',
        ),
        migrations.RemoveField(
            model_name='taskexport',
            name='stop_requested_at',
        ),
    ]
