// Never compiled: written without Xcode (see ios_demo/README.md).
import CryptoKit
import Foundation

/// An error with one line a person can act on (shown in the app, written to results files).
public struct MobileExportError: LocalizedError, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var errorDescription: String? { message }
    public var description: String { message }
}

/// A JSON object read with `JSONSerialization`, looked up by dotted paths such as
/// `"tokenizer.eos_ids"`. Every manifest and reference field is read through `path`.
public struct JSONDocument: @unchecked Sendable {
    /// The file's bytes, exactly as read (the manifest's sha256 is taken over these).
    public let bytes: Data
    private let root: [String: Any]

    public init(contentsOf url: URL) throws {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw MobileExportError("cannot read \(url.lastPathComponent): \(error.localizedDescription)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: data), let root = object as? [String: Any] else {
            throw MobileExportError("\(url.lastPathComponent) is not a JSON object")
        }
        self.bytes = data
        self.root = root
    }

    /// The value at a dotted path ("artifact.file"), or nil when a step is missing or JSON null.
    public func path(_ dotted: String) -> Any? {
        var node: Any? = root
        for key in dotted.split(separator: ".") {
            guard let object = node as? [String: Any] else { return nil }
            node = object[String(key)]
        }
        return node is NSNull ? nil : node
    }
}

/// What this app needs from a bundle's `manifest.json`, every decision read from the bundle.
public struct BundleManifest: @unchecked Sendable {
    public static let supportedSchema = 1

    public let folder: URL
    public let manifest: JSONDocument
    public let backend: String
    public let artifactFormat: String
    public let artifactURL: URL
    public let contextLength: Int
    public let quantization: String?
    /// Core ML only: `all`, `cpu_only`, `cpu_and_gpu` or `cpu_and_ne`.
    public let computeUnits: String?
    public let deploymentTarget: String?
    public let callingConvention: String?
    public let minimumIOS: String?
    /// Names of the program's inputs and how many state tensors (the Core ML KV cache) it has.
    public let inputNames: [String]
    public let stateCount: Int
    public let tokenizerFiles: [URL]
    public let bosId: Int?
    public let addBos: Bool
    public let eosIds: [Int]
    public let endOfTurnIds: [Int]
    public let chatTemplate: String?

    /// Read and check `folder/manifest.json`.
    public init(folder: URL) throws {
        let manifest = try JSONDocument(contentsOf: folder.appendingPathComponent("manifest.json"))
        guard let schema = manifest.path("schema_version") as? Int else {
            throw MobileExportError("manifest.json: schema_version missing; rebuild the bundle")
        }
        guard schema <= BundleManifest.supportedSchema else {
            throw MobileExportError("manifest.json uses schema \(schema); this app reads up to \(BundleManifest.supportedSchema)")
        }
        guard let file = manifest.path("artifact.file") as? String,
              let format = manifest.path("artifact.format") as? String,
              let backend = manifest.path("backend") as? String,
              let context = manifest.path("context_length") as? Int, context > 0
        else {
            throw MobileExportError("manifest.json lacks artifact.file, artifact.format, backend or context_length")
        }
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.artifactFormat = format
        self.artifactURL = try BundleManifest.resolve(file, in: folder)
        self.contextLength = context
        self.quantization = manifest.path("quantization.scheme") as? String
        self.computeUnits = manifest.path("artifact.compute_units") as? String
        self.deploymentTarget = manifest.path("artifact.minimum_deployment_target") as? String
        self.callingConvention = manifest.path("artifact.calling_convention") as? String
        self.minimumIOS = manifest.path("min_os.ios") as? String
        let inputs = manifest.path("inputs") as? [[String: Any]] ?? []
        self.inputNames = inputs.compactMap { $0["name"] as? String }
        self.stateCount = (manifest.path("states") as? [Any])?.count ?? 0
        let names = manifest.path("tokenizer.files") as? [String] ?? []
        self.tokenizerFiles = try names.map { try BundleManifest.resolve($0, in: folder) }
        self.bosId = manifest.path("tokenizer.bos_id") as? Int
        self.addBos = manifest.path("tokenizer.add_bos") as? Bool ?? true
        self.eosIds = manifest.path("tokenizer.eos_ids") as? [Int] ?? []
        self.endOfTurnIds = manifest.path("tokenizer.end_of_turn_ids") as? [Int] ?? []
        self.chatTemplate = manifest.path("tokenizer.chat_template") as? String
        try checkOperatingSystem()
    }

    /// Hex sha256 of the manifest's bytes (results files prove with it which bundle ran).
    public var manifestSHA256: String {
        SHA256.hash(data: manifest.bytes).map { String(format: "%02x", $0) }.joined()
    }

    /// Every id that ends a chat reply: the EOS ids and the template's end-of-turn token.
    public var stopIds: Set<Int> { Set(eosIds).union(endOfTurnIds) }

    /// `reference.json` beside the manifest, when the bundle has one.
    public var referenceURL: URL? {
        let url = folder.appendingPathComponent("reference.json")
        return FileManager.default.fileExists(atPath: url.path) ? url : nil
    }

    /// A file the manifest names, as a URL inside the bundle. Names with '/' or '..' are refused,
    /// and so is anything that resolves (through links) outside the folder: nothing in a bundle
    /// may make the app read elsewhere.
    static func resolve(_ name: String, in folder: URL) throws -> URL {
        guard !name.isEmpty, !name.contains("/"), !name.contains(".."), !name.contains("\0") else {
            throw MobileExportError("manifest.json names '\(name)', which is not a plain file name in the bundle")
        }
        let root = folder.standardizedFileURL.resolvingSymlinksInPath().path
        let url = folder.appendingPathComponent(name)
        let resolved = url.standardizedFileURL.resolvingSymlinksInPath().path
        guard resolved.hasPrefix(root.hasSuffix("/") ? root : root + "/") else {
            throw MobileExportError("'\(name)' leads outside the bundle folder")
        }
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw MobileExportError("the bundle has no '\(name)' (copy the whole bundle folder)")
        }
        return url
    }

    /// Refuse a bundle built for a newer iOS than this device runs.
    private func checkOperatingSystem() throws {
        #if os(iOS)
        guard let minimumIOS, let major = Int(minimumIOS.split(separator: ".").first ?? "") else { return }
        let needed = OperatingSystemVersion(majorVersion: major, minorVersion: 0, patchVersion: 0)
        if !ProcessInfo.processInfo.isOperatingSystemAtLeast(needed) {
            throw MobileExportError("the bundle needs iOS \(minimumIOS) or later")
        }
        #endif
    }
}
