"""Tasks and exports point at their current run (gpus.Run)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gpus', '0004_run'),
        ('tasks', '0004_resume_export'),
    ]

    operations = [
        migrations.AddField(
            model_name='finetuningtask',
            name='run',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='gpus.run', verbose_name='current run'),
        ),
        migrations.AddField(
            model_name='taskexport',
            name='run',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='gpus.run', verbose_name='current run'),
        ),
    ]
