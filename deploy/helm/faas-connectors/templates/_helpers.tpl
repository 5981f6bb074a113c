{{/* Labels of a connector's objects; call with (dict "name" NAME "root" $). */}}
{{- define "faas-connectors.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: connector
app.kubernetes.io/part-of: faas-connectors
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Selector labels; call with (dict "name" NAME "root" $). */}}
{{- define "faas-connectors.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}
