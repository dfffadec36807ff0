{{/*
The objects keep the names kubeadm's kube-proxy addon would have, with
kube-wasm-proxy for kube-proxy: one proxy per cluster, so no release prefix.
*/}}
{{- define "kwp.name" -}}kube-wasm-proxy{{- end -}}

{{- define "kwp.labels" -}}
app.kubernetes.io/name: {{ include "kwp.name" . }}
{{- end -}}

{{- define "kwp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Where the ConfigMap is mounted; config.conf names kubeconfig.conf in it. */}}
{{- define "kwp.configDir" -}}/var/lib/kube-wasm-proxy{{- end -}}

{{/* The image's plugin directory, or the projected policy ConfigMaps'. */}}
{{- define "kwp.pluginDir" -}}
{{- if .Values.policyConfigMaps -}}
/etc/kube-wasm-proxy/plugins
{{- else -}}
/usr/local/lib/kube-wasm-proxy/plugins
{{- end -}}
{{- end -}}

{{/* The port of config.healthzBindAddress: the probes' and kube-proxy's 10256. */}}
{{- define "kwp.healthzPort" -}}
{{- .Values.config.healthzBindAddress | default "0.0.0.0:10256" | splitList ":" | last -}}
{{- end -}}
