{{- define "wa.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wa.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wa.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "wa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wa.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wa.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret (and key `url`) holding the database URL. */}}
{{- define "wa.dbSecret" -}}
{{- if .Values.postgres.external.existingSecret -}}
{{- .Values.postgres.external.existingSecret -}}
{{- else -}}
{{- printf "%s-db" (include "wa.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "wa.postgresName" -}}
{{- printf "%s-postgres" (include "wa.fullname" .) -}}
{{- end -}}

{{- define "wa.podSecurity" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "wa.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
The bundled Postgres' password: the one in its Secret when that exists (an upgrade, or a reinstall
after `helm uninstall`, which keeps the Secret with the data volume), else a new random one.
Computed once per render, so the Secret and the checksum annotation agree.
*/}}
{{- define "wa.postgresPassword" -}}
{{- if not (hasKey .Values.postgres "_password") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "wa.postgresName" .) -}}
{{- $password := randAlphaNum 32 -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- $password = index $existing.data "password" | b64dec -}}
{{- end -}}
{{- $_ := set .Values.postgres "_password" $password -}}
{{- end -}}
{{- .Values.postgres._password -}}
{{- end -}}

{{/* The database URL the chart stores (empty when it is in the user's own Secret). */}}
{{- define "wa.databaseUrl" -}}
{{- if .Values.postgres.external.existingSecret -}}
{{- else if .Values.postgres.enabled -}}
{{- printf "postgres://%s:%s@%s.%s.svc:5432/%s" .Values.postgres.user (include "wa.postgresPassword" .) (include "wa.postgresName" .) .Release.Namespace .Values.postgres.database -}}
{{- else -}}
{{- .Values.postgres.external.url -}}
{{- end -}}
{{- end -}}

{{/*
What the operator's database URL is, as a checksum for its pod template: a change rolls the
operator (env from a Secret is read only at start). For the user's own Secret, its current
value when it can be read.
*/}}
{{- define "wa.databaseChecksum" -}}
{{- if .Values.postgres.external.existingSecret -}}
{{- $s := lookup "v1" "Secret" .Release.Namespace .Values.postgres.external.existingSecret -}}
{{- if and $s $s.data -}}
{{- index $s.data "url" | default "" | sha256sum -}}
{{- else -}}
{{- "unknown" | sha256sum -}}
{{- end -}}
{{- else -}}
{{- include "wa.databaseUrl" . | sha256sum -}}
{{- end -}}
{{- end -}}
