// Never compiled: written without Xcode (see ios_demo/README.md).
import SwiftUI
import UniformTypeIdentifiers

/// The app's first screen: pick a bundle folder (Files, or one shipped in / copied to the app),
/// see what its manifest says and how its `reference.json` check went, then chat.
public struct BundlePickerView: View {
    @StateObject private var session = ChatSession()
    @State private var picking = false
    @State private var found: [URL] = []

    public init() {}

    public var body: some View {
        NavigationStack {
            List {
                Section("Bundle") {
                    Button("Choose a bundle folder…") { picking = true }
                    ForEach(found, id: \.self) { folder in
                        Button(folder.lastPathComponent) { session.open(folder) }
                    }
                }
                if let bundle = session.bundle {
                    Section("Manifest") {
                        LabeledContent("Backend", value: bundle.backend)
                        LabeledContent("Quantization", value: bundle.quantization ?? "–")
                        LabeledContent("Context", value: "\(bundle.contextLength) tokens")
                        LabeledContent("Artifact", value: bundle.artifactFormat)
                        if let units = bundle.computeUnits { LabeledContent("Compute units", value: units) }
                        if let target = bundle.deploymentTarget { LabeledContent("Deployment target", value: target) }
                        if let convention = bundle.callingConvention { Text(convention).font(.caption).foregroundStyle(.secondary) }
                    }
                }
                if let parity = session.parity {
                    Section("reference.json check") { ParityView(report: parity) }
                }
                Section {
                    Text(session.status).font(.callout)
                    if session.busy { ProgressView() }
                    if session.canChat {
                        NavigationLink("Chat") { ChatView(session: session) }
                    }
                }
            }
            .navigationTitle("mobile-export")
            .onAppear { found = BundleLocations.bundles() }
            .fileImporter(isPresented: $picking, allowedContentTypes: [.folder]) { result in
                if case .success(let folder) = result { session.open(folder) }
            }
        }
    }
}

/// Pass/fail and the figures of the reference check, per prompt.
struct ParityView: View {
    let report: ParityReport

    var body: some View {
        Label(
            report.passed ? (report.enforced ? "Passed" : "Not enforced: figures only") : "Failed",
            systemImage: report.passed ? "checkmark.seal" : "xmark.octagon"
        )
        .foregroundStyle(report.passed ? Color.green : Color.red)
        Text("Limits: \(report.limits)").font(.caption)
        ForEach(Array(report.prompts.enumerated()), id: \.offset) { index, prompt in
            VStack(alignment: .leading) {
                Text(String(
                    format: "Prompt %d: agreement %.0f%% · max |Δ| %.3f · mean |Δ| %.3f nat",
                    index, prompt.agreement * 100, prompt.maxAbsDiff, prompt.meanAbsDiff
                )).font(.caption.monospacedDigit())
                ForEach(prompt.failures, id: \.self) { Text($0).font(.caption).foregroundStyle(.red) }
            }
        }
    }
}

/// Bundle folders the app can see without the picker: folders added to the app target (as a
/// folder reference) and folders copied into Documents (e.g. by `xcrun devicectl device copy to`).
enum BundleLocations {
    static func bundles() -> [URL] {
        let files = FileManager.default
        let documents = files.urls(for: .documentDirectory, in: .userDomainMask).first
        let roots = [Bundle.main.resourceURL, documents, documents?.appendingPathComponent("mobile-export/bundles")]
        return roots.compactMap { $0 }.flatMap { root in
            ((try? files.contentsOfDirectory(at: root, includingPropertiesForKeys: nil)) ?? []).filter {
                files.fileExists(atPath: $0.appendingPathComponent("manifest.json").path)
            }
        }
    }
}
