"""A deployment points at its current run (gpus.Run)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('deployments', '0002_deployment_runtime'),
        ('gpus', '0004_run'),
    ]

    operations = [
        migrations.AddField(
            model_name='deployment',
            name='run',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='gpus.run', verbose_name='current run'),
        ),
    ]
