{{- define "tally.fullname" -}}
{{- printf "%s-tally" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tally.labels" -}}
app.kubernetes.io/name: tally
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tally.selector" -}}
app.kubernetes.io/name: tally
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tally.secretName" -}}
{{- default (printf "%s-secrets" (include "tally.fullname" .)) .Values.existingSecret -}}
{{- end -}}

{{/* The environment every Tally process shares: settings, endpoints, secrets. */}}
{{- define "tally.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "tally.fullname" . }}-settings
  - secretRef:
      name: {{ include "tally.secretName" . }}
{{- end -}}

{{- define "tally.probes" -}}
{{- $p := .root.Values.probes -}}
readinessProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
livenessProbe:
  httpGet: {path: /livez, port: {{ .port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ mul $p.failureThreshold 2 }}
{{- end -}}

{{- define "tally.scrape" -}}
{{- if .root.Values.metrics.annotations }}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .port | quote }}
  prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{- define "tally.securityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  fsGroup: 1000
{{- end -}}
